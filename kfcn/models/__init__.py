"""kfcn's own classifiers, for the backbones Keras Applications lacks.

- `kfcn.models.resnet`: ResNet V1b / V1c, 18 to 152 layers, as torchvision and
  mmsegmentation define them, with dilated output strides 16 and 8.
- `kfcn.models.torch_weights`: `load_torch_state_dict`, torchvision / mmseg
  checkpoints (saved as .npz) into those models, or into FCNs built on them.
- `kfcn.models.alexnet`, `kfcn.models.googlenet`: the paper's other nets.

Each is a table row of `kfcn.backbones.BACKBONES` (`module="kfcn.models.<name>"`).
Submodules load on first use, so importing `kfcn.models` costs nothing.
"""

import importlib
from typing import Any

_SUBMODULES = ("alexnet", "googlenet", "resnet", "torch_weights")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"kfcn.models.{name}")
    raise AttributeError(f"module 'kfcn.models' has no attribute {name!r}")
