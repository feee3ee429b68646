"""torch_modelstate: a PyTorch model's parameters and state by path, as in Axon's ModelState.

>>> import torch
>>> from torch import nn
>>> import torch_modelstate as tms
>>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
>>> ms = tms.ModelState.new(model).freeze("0.**")
>>> sorted(ms.trainable_parameters())
['2.bias', '2.weight']
"""

from torch_modelstate import _quiet_torch  # noqa: F401  (first: imports torch for the CLI)
from torch_modelstate import io as io
from torch_modelstate import merges as merges
from torch_modelstate import optim as optim
from torch_modelstate._errors import CheckpointCorruptError as CheckpointCorruptError
from torch_modelstate._errors import CheckpointError as CheckpointError
from torch_modelstate._errors import CheckpointMismatchError as CheckpointMismatchError
from torch_modelstate._masks import Mask as Mask
from torch_modelstate._masks import MaskLike as MaskLike
from torch_modelstate._masks import all_of as all_of
from torch_modelstate._masks import any_of as any_of
from torch_modelstate._masks import not_ as not_
from torch_modelstate._paths import to_flat as to_flat
from torch_modelstate._paths import to_key as to_key
from torch_modelstate._paths import to_nested as to_nested
from torch_modelstate._paths import to_path as to_path
from torch_modelstate._state import ModelState as ModelState
from torch_modelstate._summary import format_bytes as format_bytes
from torch_modelstate._ties import register_transform as register_transform
from torch_modelstate._ties import registered_transforms as registered_transforms
from torch_modelstate.io import load as load
from torch_modelstate.io import save as save
from torch_modelstate.optim import load_optimizer as load_optimizer
from torch_modelstate.optim import save_optimizer as save_optimizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "Mask",
    "MaskLike",
    "ModelState",
    "all_of",
    "any_of",
    "format_bytes",
    "io",
    "load",
    "load_optimizer",
    "merges",
    "not_",
    "optim",
    "register_transform",
    "registered_transforms",
    "save",
    "save_optimizer",
    "to_flat",
    "to_key",
    "to_nested",
    "to_path",
]
