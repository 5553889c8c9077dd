"""File plumbing shared by every method's save/load: atomic directories, JSON, versions.

Every fitted estimator of every method is saved as a directory of ``.npz`` arrays and JSON
metadata, never pickle. The helpers here are what those savers share; each method's ``io``
module decides what goes into its files.

A result directory is written under a temporary name beside its destination and swapped into
place only when complete. Where Linux's ``renameat2(RENAME_EXCHANGE)`` is available the swap is
one atomic step, so ``path`` always holds a whole result, old or new. Elsewhere the old result
is first renamed to a recoverable ``.<name>.previous-<pid>`` beside it; a process killed in that
window leaves it there, and the next :func:`recover_previous` (run by every load and save)
puts it back. Temporaries of a process that died are removed by the next save to that path.
"""

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import secrets
import shutil
import signal
import warnings

import numpy as np

__all__ = [
    "atomic_directory",
    "check_destination",
    "write_files_together",
    "json_default",
    "library_versions",
    "load_npz",
    "read_json",
    "read_result_metadata",
    "recover_previous",
]

_TEMP_KINDS = ("tmp", "previous")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def library_versions():
    """Return the versions of xcraft and of the libraries a saved result depends on."""
    import keras
    import tensorflow as tf

    from xcraft import __version__

    return {
        "xcraft": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    return function


_RENAMEAT2 = _libc_renameat2()


def _exchange(first, second):
    """Swap two paths atomically; False when the system cannot (then nothing has moved)."""
    if _RENAMEAT2 is None:
        return False
    status = _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                        _RENAME_EXCHANGE)
    return status == 0


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _our_temporaries(path):
    """``(kind, pid or None, full path)`` of the temporaries xcraft named after ``path``."""
    parent, base = os.path.split(path)
    pattern = re.compile(rf"^\.{re.escape(base)}\.({'|'.join(_TEMP_KINDS)})-(\d+)?")
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = pattern.match(name)
        if match:
            pid = int(match.group(2)) if match.group(2) else None
            found.append((match.group(1), pid, os.path.join(parent, name)))
    return found


def recover_previous(path):
    """Put back a result a killed save left at ``.<name>.previous-<pid>``; True if it did.

    Only when ``path`` itself is missing and the process that moved the result aside is dead.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        return False
    for kind, pid, full in sorted(_our_temporaries(path)):
        if kind == "previous" and (pid is None or not _pid_alive(pid)):
            os.replace(full, path)
            warnings.warn(
                f"Restored the result at {path!r} from {os.path.basename(full)!r}, where a save "
                f"that was interrupted had moved it.",
                UserWarning,
                stacklevel=3,
            )
            return True
    return False


def _clean_stale(path):
    for kind, pid, full in _our_temporaries(path):
        if kind == "tmp" and (pid is None or not _pid_alive(pid)):
            shutil.rmtree(full, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM for the few renames that must happen together.

    A Python handler records them and they are raised again afterwards. (Blocking them with
    ``pthread_sigmask`` would not do: it masks one thread, and TensorFlow's threads take them.)
    """
    received = []

    def hold(signum, frame):
        received.append(signum)

    held = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {signum: signal.signal(signum, hold) for signum in held}
    except ValueError:  # not the main thread: signals go to the main thread's handlers anyway
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler installed outside Python, which cannot be put back; default then.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if received:
            signal.raise_signal(received[0])


def _is_ours(directory, marker):
    marker_path = os.path.join(directory, marker)
    if not os.path.isfile(marker_path):
        return False
    try:
        with open(marker_path, encoding="utf-8") as file:
            content = json.load(file)
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "format_version" in content


class atomic_directory:  # noqa: N801 - used as a context manager, reads like `open`
    """Context manager yielding a temporary directory that replaces ``path`` on success.

    Parameters
    ----------
    path : str or os.PathLike
        The result directory.
    marker : str, default="metadata.json"
        The JSON file (with a ``format_version``) that identifies a result of this kind.
    own_names : iterable of str or callable, default=None
        The top-level names this kind of result writes (or a predicate on a name). Anything
        else found in an existing result (a user's notes, say) is moved into the new one: a
        save never deletes what xcraft did not write. None: every name is the result's own.
    overwrite : bool, default=False
        Allow ``path`` to be a non-empty directory that is not a result of this kind. Its
        files are then kept in the new result, and a name the result needs refuses the save.

    Raises
    ------
    ValueError
        If ``path`` is a file, or a non-empty directory that is not a result of this kind and
        ``overwrite`` is False (checked on entry, before any work).

    Notes
    -----
    On an exception the temporary directory is removed and ``path`` is left as it was.
    """

    def __init__(self, path, *, marker="metadata.json", own_names=None, overwrite=False):
        self.path = os.path.abspath(os.fspath(path))
        self.marker = marker
        if own_names is None or callable(own_names):
            self._is_own_name = own_names or (lambda name: True)
        else:
            self._is_own_name = set(own_names).__contains__
        self.overwrite = bool(overwrite)

    def _check_destination(self):
        check_destination(self.path, marker=self.marker, overwrite=self.overwrite)

    def __enter__(self):
        parent = os.path.dirname(self.path)
        recover_previous(self.path)
        self._check_destination()
        os.makedirs(parent, exist_ok=True)
        _clean_stale(self.path)
        base = os.path.basename(self.path)
        self.tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(self.tmp)
        return self.tmp

    def _carry_foreign_files(self):
        """Move what the old result holds beyond the result's own names into the new one."""
        ours = _is_ours(self.path, self.marker)
        for name in os.listdir(self.path):
            foreign = not ours or not self._is_own_name(name)
            if not foreign:
                continue
            if os.path.lexists(os.path.join(self.tmp, name)):
                raise ValueError(
                    f"`path` holds {name!r}, a name the result writes, in {self.path!r}, which "
                    f"is not an xcraft result. Move that file, or choose another path."
                )
            os.replace(os.path.join(self.path, name), os.path.join(self.tmp, name))

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        try:
            self._check_destination()  # another process may have written there meanwhile
            with _signals_deferred():
                if not os.path.isdir(self.path):
                    os.replace(self.tmp, self.path)
                    return False
                self._carry_foreign_files()
                if _exchange(self.tmp, self.path):
                    old = self.tmp
                else:
                    old = os.path.join(
                        os.path.dirname(self.path),
                        f".{os.path.basename(self.path)}.previous-{os.getpid()}-"
                        f"{secrets.token_hex(4)}",
                    )
                    os.replace(self.path, old)
                    os.replace(self.tmp, self.path)
        except BaseException:
            if old is not None and os.path.isdir(old) and not os.path.lexists(self.path):
                os.rename(old, self.path)  # the swap failed half-way: the old result goes back
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return False


def check_destination(path, *, marker, overwrite=False):
    """Refuse ``path`` unless it is new, an empty directory or a result with ``marker``.

    Parameters
    ----------
    path : str or os.PathLike
    marker : str
        The JSON file (holding a ``format_version``) that identifies a result of this kind.
    overwrite : bool, default=False
        Accept any directory (the caller keeps the files it finds there).

    Raises
    ------
    ValueError
        If ``path`` is a file, or a non-empty directory of someone else's files.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(
            f"`path` must be a directory or a new name, got the existing file {path!r}."
        )
    if not os.path.isdir(path) or not os.listdir(path):
        return
    if _is_ours(path, marker) or overwrite:
        return
    entries = sorted(os.listdir(path))
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise ValueError(
        f"`path` must be a new name, an empty directory or an earlier result, got {path!r}, "
        f"which holds other files ({shown}). Choose another path, or pass `overwrite=True` to "
        f"write the result there (those files are kept)."
    )


def write_files_together(directory, texts):
    """Write several text files into ``directory`` so that they appear together.

    Every file is written in full under a temporary name first; the renames that put them in
    place then run with SIGINT and SIGTERM held, so an interrupt leaves either all the old
    files or all the new ones (a SIGKILL between two renames, microseconds apart, is the only
    window). ``directory`` is created only then: a failed run leaves no empty folder.

    Parameters
    ----------
    directory : str or os.PathLike
    texts : dict of str to str or bytes
        File name to content (bytes are written as they are).
    """
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{os.getpid()}-"
                                   f"{secrets.token_hex(4)}")
    os.mkdir(staging)
    try:
        for name, content in texts.items():
            binary = isinstance(content, bytes)
            with open(os.path.join(staging, name), "xb" if binary else "x",
                      encoding=None if binary else "utf-8") as file:
                file.write(content)
        with _signals_deferred():
            if not os.path.isdir(directory):
                os.replace(staging, directory)
                return
            for name in texts:
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def json_default(value):
    """Convert NumPy scalars and arrays for ``json.dump`` (its ``default`` hook)."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def read_json(path):
    """Read a JSON object from ``path``, naming the file in every error.

    Raises
    ------
    ValueError
        If the file is missing, is not valid JSON or does not hold a JSON object.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Expected the file {path!r}, which does not exist.")
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"The file {path!r} is not valid JSON ({err}).") from err
    if not isinstance(value, dict):
        raise ValueError(
            f"The file {path!r} must hold a JSON object, got a JSON {type(value).__name__}."
        )
    return value


def read_result_metadata(directory, file_name, supported_version, *, writer="`save`"):
    """Read the JSON metadata of a saved result and check its ``format_version``.

    Parameters
    ----------
    directory : str or os.PathLike
        The result directory (a result a killed save moved aside is restored first).
    file_name : str
        Its metadata file.
    supported_version : int
        The newest format this xcraft reads.
    writer : str, default="`save`"
        What writes such results, for the message.

    Raises
    ------
    ValueError
        If the file is missing or corrupt, or its version is not an int >= 1 or is newer.
    """
    directory = os.fspath(directory)
    recover_previous(directory)
    path = os.path.join(directory, file_name)
    if not os.path.isfile(path):
        raise ValueError(
            f"`path` must be a directory written by {writer}, got {directory!r}, which has no "
            f"{file_name}."
        )
    metadata = read_json(path)
    version = metadata.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            f"The file {path!r} must have an integer `format_version` >= 1, got {version!r}: "
            f"it was not written by xcraft, or it is corrupt."
        )
    if version > supported_version:
        raise ValueError(
            f"The result at {directory!r} was saved in format version {version!r}, newer than "
            f"this xcraft understands ({supported_version}). Upgrade xcraft to load it."
        )
    return metadata


def load_npz(path):
    """Read every array of an ``.npz`` file (never pickle), naming the file in every error.

    Returns
    -------
    dict of str to ndarray

    Raises
    ------
    ValueError
        If the file is missing, truncated, not an npz archive, or holds pickled objects.
    """
    import zipfile

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Expected the file {path!r}, which does not exist.")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("it holds a single array, not a named archive")
            return {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"The file {path!r} is not a readable npz archive of plain arrays ({err}). It may "
            f"be truncated or corrupt: save the result again."
        ) from err
