"""The demo: FCN-32s, FCN-16s and FCN-8s trained on generated data, on the CPU.

    kfcn demo [--output_dir kfcn_demo] [--quick]      (or python -m kfcn.demo)

Modules:
    synthetic: the generated dataset (textured materials, thin wires, small beads),
        deterministic from a seed, written in the `folder` layout.
    backbone: the small VGG-style trunk the demo's FCNs are built on.
    run: the job (`run_demo`): data, staged training through `kfcn.training.fit`,
        scores, pictures, exports and `kfcn predict`.

Importing `kfcn.demo` imports neither TensorFlow nor Keras.
"""
