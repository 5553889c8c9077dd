#!/usr/bin/env bash
# Create a private virtual environment holding Xplique 2.0.2 for the side-by-side benchmarks.
#
# Xplique is NOT a dependency of xcraft. It pins tensorflow[and-cuda]<=2.20, so it is installed
# here without its dependency resolution, into a venv that sees the system site-packages (the
# installed tensorflow 2.21 / Keras 3) but never writes to them. See /work/shared/DATA.md,
# "Xplique beside tensorflow-cpu".
#
# Usage:  bash bench/setup_xplique_env.sh [VENV_DIR]      (default: /tmp/xplique-venv)
#         then run a benchmark with  VENV_DIR/bin/python bench/fit.py
# Idempotent: re-running it only checks that xplique imports.
set -euo pipefail

VENV="${1:-${XPLIQUE_VENV:-/tmp/xplique-venv}}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV (with --system-site-packages, to reuse the installed tensorflow)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi

# Every pip call goes through the venv's interpreter, so nothing lands in the global site.
VPY="$VENV/bin/python"
# On a fresh machine the base interpreter has no TensorFlow: give the venv the same stack xcraft
# runs on (the benchmarks import xcraft from the checkout, so its runtime dependencies too).
if ! "$VPY" -c "import tensorflow, sklearn, scipy, matplotlib, tqdm" >/dev/null 2>&1; then
    "$VPY" -m pip install --quiet "tensorflow>=2.16" numpy scipy scikit-learn matplotlib tqdm
fi
if "$VPY" -c "import xplique.concepts" >/dev/null 2>&1; then
    echo "xplique already importable in $VENV"
else
    "$VPY" -m pip install --quiet einops deprecated opencv-python-headless "scikit-image<=0.25.2" \
        dm-tree decorator cloudpickle gast absl-py six
    "$VPY" -m pip install --quiet --no-deps xplique==2.0.2 tensorflow-probability==0.25.0 \
        tf-keras==2.21.0
fi

"$VPY" - <<'EOF'
import sys
import tensorflow as tf
import xplique
from xplique.concepts import CraftTf  # noqa: F401
print(f"ok: python {sys.version.split()[0]}, tensorflow {tf.__version__}, "
      f"xplique {xplique.__version__} from {xplique.__file__}")
EOF
