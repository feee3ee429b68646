"""Old import path of the checkpoint internals, kept while callers move to `checkpoint/`.

The codec is `torch_modelstate.checkpoint._codec`, reading files
`torch_modelstate.checkpoint._files`, writing `torch_modelstate.checkpoint._writer`, the
output layout `torch_modelstate.checkpoint._layout`. Import from those; this module goes
once nothing imports it.
"""

from torch_modelstate.checkpoint._codec import CODE as CODE
from torch_modelstate.checkpoint._codec import ITEMSIZE as ITEMSIZE
from torch_modelstate.checkpoint._codec import TORCH_DTYPE as TORCH_DTYPE
from torch_modelstate.checkpoint._codec import Spec as Spec
from torch_modelstate.checkpoint._codec import TensorInfo as TensorInfo
from torch_modelstate.checkpoint._codec import dtype_name as dtype_name
from torch_modelstate.checkpoint._codec import header_bytes as header_bytes
from torch_modelstate.checkpoint._codec import tensor_bytes as tensor_bytes
from torch_modelstate.checkpoint._files import INDEX_FILE as INDEX_FILE
from torch_modelstate.checkpoint._files import SINGLE_FILE as SINGLE_FILE
from torch_modelstate.checkpoint._files import Checkpoint as Checkpoint
from torch_modelstate.checkpoint._files import Shard as Shard
from torch_modelstate.checkpoint._files import open_checkpoint as open_checkpoint
from torch_modelstate.checkpoint._files import read_header as read_header
from torch_modelstate.checkpoint._files import resolve as resolve
from torch_modelstate.checkpoint._files import shard_name as shard_name
from torch_modelstate.checkpoint._layout import output_layout as output_layout
from torch_modelstate.checkpoint._layout import parse_size as parse_size
from torch_modelstate.checkpoint._layout import plan_shards as plan_shards
from torch_modelstate.checkpoint._writer import Fill as Fill
from torch_modelstate.checkpoint._writer import Progress as Progress
from torch_modelstate.checkpoint._writer import write_checkpoint as write_checkpoint
