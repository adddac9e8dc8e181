#!/usr/bin/env bash
# Creates the peer's own virtualenv for bench/peer_keras_segmentation.py:
# keras-segmentation 0.3.0 (PyPI, the FCN Keras users most often reach for) on the
# same TensorFlow as kfcn's, never a kfcn dependency.
#
#   bash bench/peer_env.sh [VENV_DIR]        # default: .venv-peer beside .venv
#   PEER_OWN_TENSORFLOW=1 bash bench/peer_env.sh   # pip-install TensorFlow into it too
#
# keras-segmentation 0.3.0 was written for Keras 2, so on TensorFlow 2.21 it needs:
#  - tf-keras (Keras 2) importable as `keras`: `keras` in the venv is a symlink to
#    `tf_keras` (Keras 3 must not be that name), and TF_USE_LEGACY_KERAS=1 when it runs;
#  - its install_requires skipped (h5py<=2.10 / imageio==2.5 / imgaug==0.2.9 do not build
#    on Python 3.11): installed with --no-deps plus opencv-python-headless, six, tqdm;
#  - its unconditional `from .augmentation import augment_seg` (imgaug, only used when
#    training with do_augment=True) made optional.
# By default TensorFlow is not downloaded again: a .pth file appends the main venv's
# site-packages, so the peer runs on exactly kfcn's TensorFlow build (its own packages,
# `keras` included, come first on sys.path).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
main_python="${MAIN_PYTHON:-$here/.venv/bin/python}"
venv="${1:-$here/.venv-peer}"

"$main_python" -m venv "$venv"
peer="$venv/bin/python"
site="$("$peer" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
tf_version="$("$main_python" -c 'import importlib.metadata as m; print(m.version("tensorflow"))')"
"$peer" -m pip install -q --upgrade pip
if [ "${PEER_OWN_TENSORFLOW:-0}" = "1" ]; then
  "$peer" -m pip install -q "tensorflow==$tf_version"
  "$peer" -m pip uninstall -y -q keras
else
  "$main_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
    > "$site/zz_main_venv.pth"
fi
# tf-keras tracks TensorFlow's minor version.
"$peer" -m pip install -q "tf-keras~=${tf_version%.*}.0" opencv-python-headless six tqdm
"$peer" -m pip install -q --no-deps keras-segmentation==0.3.0
rm -rf "$site/keras"
ln -s tf_keras "$site/keras"
loader="$site/keras_segmentation/data_utils/data_loader.py"
"$peer" - "$loader" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
old = "from .augmentation import augment_seg\n"
new = "try:\n    from .augmentation import augment_seg\nexcept ImportError:  # imgaug absent\n    augment_seg = None\n"
if old in text:
    open(path, "w").write(text.replace(old, new))
EOF
TF_USE_LEGACY_KERAS=1 "$peer" -c '
import keras, tensorflow as tf
from keras_segmentation.models.fcn import fcn_8_vgg  # noqa: F401
print("peer venv ok: keras", keras.__version__, "tensorflow", tf.__version__)'
