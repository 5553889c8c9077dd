"""TensorFlow imported once, with its C++ start-up lines held back.

TensorFlow writes absl / oneDNN / CUDA-probe lines ("cudart_stub", "cuInit", CPU features) to
file descriptor 2 before ``TF_CPP_MIN_LOG_LEVEL`` is read, so notebooks show them under the
first cell that touches xcraft and every command prints them. Each of xcraft's TensorFlow
subpackages ``ops``, ``afi``, ``coupled`` (and each TensorFlow module of ``craft`` and
``plumbing``, whose other modules the command line uses before it needs TensorFlow) imports
this module first, so whichever part of xcraft a user imports first, the lines stay off the
terminal. A user who imports TensorFlow before xcraft sees them: that import is theirs.
"""

import os
import sys
import tempfile


def import_quietly():
    """Import TensorFlow with file descriptor 2 redirected; return the module.

    A no-op (beyond the return) once TensorFlow is imported. What was written is shown after
    all if the import fails, so a broken installation still explains itself.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2 (some embedded interpreters)
        import tensorflow as tf

        return tf
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe logs here, not at import
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tf


tensorflow = import_quietly()
