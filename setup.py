"""Installs the `kfcn` library (recipes/, export/ and bench/ are script folders)."""

from setuptools import find_packages, setup

setup(
    name="kfcn",
    version="0.1.0",
    description=(
        "Fully Convolutional Networks for semantic segmentation (Long, Shelhamer, "
        "Darrell, CVPR 2015 / TPAMI 2017) in Keras 3 on TensorFlow."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kfcn", "kfcn.*"]),
    # The FCN authors' SIFT Flow split lists (kfcn.data.siftflow) and the shipped
    # trained models (kfcn.presets).
    package_data={
        "kfcn.data": ["siftflow_splits/*.txt"],
        "kfcn": ["preset_files/*/*.json", "preset_files/*/*.npz"],
    },
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3",
        "tensorflow-datasets",
        "numpy",
        "pillow",
        "absl-py",
        "scipy",  # .mat masks of SBD, NYUDv2 and SIFT Flow
        "wrapt",  # post-import hook: kfcn's Keras classes registered by `import kfcn`
        "pyyaml",  # `kfcn train --config run.yaml`
        "tqdm",  # progress bars of the `kfcn` command
        "matplotlib",  # overlays' legends, confusion matrices, training curves
    ],
    entry_points={"console_scripts": ["kfcn = kfcn.cli:entry_point"]},
    extras_require={
        "tflite": ["ai-edge-litert"],
        "serving": ["tensorflow-serving-api", "grpcio", "requests"],
        "onnx": ["tf2onnx", "onnxruntime"],
        "test": [
            "pytest",
            "pytest-xdist",  # CI runs the suite in two processes, one per core
            "ruff",
            "scipy",
            "ai-edge-litert",
            "tensorflow-serving-api",
            "grpcio",
            "requests",
            "tf2onnx",
            "onnxruntime",
        ],
    },
)
