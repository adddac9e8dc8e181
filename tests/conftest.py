"""Shared test set-up: quiet TensorFlow, deterministic seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Presets named on a command line are written once as .keras files to the cache
# (`kfcn.presets.preset_model_path`): keep the tests' copies out of ~/.cache.
if "KFCN_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["KFCN_CACHE_DIR"] = tempfile.mkdtemp(prefix="kfcn_test_cache_")
