"""Write a state dict the way PyTorch 0.3 under Python 2 did, byte layout and pickle opcodes.

The released DeepLab-v2 files (AdaptSegNet's `DeepLab_resnet_pretrained_init-f81d91e8.pth`,
the GTA5-pretrained and adapted models of 2018-2019) predate torch's zip format. Their layout,
from PyTorch 0.3's `serialization._save` and `Tensor.__reduce__`:

- four protocol-2 pickles in a row: the magic number, protocol version 1001, a sys-info dict,
  then the object; storages are persistent ids `('storage', torch.FloatStorage, key, 'cpu',
  numel, None)` and each tensor is `torch._utils._rebuild_tensor(storage, offset, size, stride)`
  (the first version, before requires_grad was pickled);
- a fifth pickle: the sorted storage keys; then per key an int64 element count and the raw
  little-endian data;
- Python 2 writes `str` as SHORT_BINSTRING (bytes, not unicode) and an OrderedDict as
  `OrderedDict([[key, value], ...])` through REDUCE.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path

import torch

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


class _Storage:
    """A tensor's data, to be written after the pickles under `key`."""

    def __init__(self, key: str, tensor: torch.Tensor) -> None:
        self.key, self.tensor = key, tensor.detach().float().contiguous()


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 with Python 2's opcodes for str and OrderedDict, and 0.3's tensor reduction."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: io.BytesIO, storages: list[_Storage]) -> None:
        super().__init__(file, protocol=2)
        self.storages = storages

    def save_python2_str(self, obj: str) -> None:
        data = obj.encode("ascii")
        self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        self.memoize(obj)

    dispatch[str] = save_python2_str

    def persistent_id(self, obj: object) -> tuple | None:
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.tensor.numel(), None)
        return None

    def reducer_override(self, obj: object) -> tuple:
        if isinstance(obj, collections.OrderedDict):
            return collections.OrderedDict, ([[k, v] for k, v in obj.items()],)
        if isinstance(obj, torch.Tensor):
            storage = _Storage(str(140000000 + len(self.storages)), obj)
            self.storages.append(storage)
            return torch._utils._rebuild_tensor, (storage, 0, tuple(obj.shape), obj.stride())
        return NotImplemented


def write_torch03_file(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """`state` as an OrderedDict of float tensors, saved as PyTorch 0.3 under Python 2 did."""
    out = io.BytesIO()
    sys_info = {
        "protocol_version": PROTOCOL_VERSION,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 8},
    }
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info):
        _Python2Pickler(out, []).dump(header)
    storages: list[_Storage] = []
    _Python2Pickler(out, storages).dump(collections.OrderedDict(state))
    storages.sort(key=lambda s: s.key)
    _Python2Pickler(out, []).dump([s.key for s in storages])
    for storage in storages:
        out.write(struct.pack("<q", storage.tensor.numel()) + storage.tensor.numpy().tobytes())
    path.write_bytes(out.getvalue())
    return path
