"""An APET adapter folder as a server needs it, without the model it was trained on: per target layer (by its name
in the Hugging Face model), its shape, its positions (regenerated from the seed, or stored) and its values, each
checked against the folder's own records; and the two things a server does with a layer's deltas: check a base
weight against the adapter's fingerprint, and merge the deltas into it."""

from __future__ import annotations

import functools
import glob
import json
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

from ..adapters.records import check_shape, saved_positions
from ..errors import AdapterFileError, BaseMismatchError
from ..ops.reference import scatter_merge_
from ..serialization import base_fingerprint, read_folder


@dataclass(frozen=True)
class LayerDeltas:
    """One target layer's deltas: flat positions into its (out, in) weight, sorted, and their values."""
    name: str
    shape: tuple[int, int]
    indices: torch.Tensor  # int64, (K,)
    values: torch.Tensor  # (K,)
    fingerprint: str | None  # of the base weight at the positions, as the adapter was trained on it

    def check_base(self, weight: torch.Tensor, what: str) -> None:
        """``weight`` (out, in) is the base this adapter was trained on at its positions, or raise naming ``what``."""
        check_shape(self.name, {"shape": list(self.shape)}, tuple(weight.shape), f" ({what})")
        self.check_base_values(weight.reshape(-1)[self.indices], what)

    def check_base_values(self, base: torch.Tensor, what: str) -> None:
        """``base``: the weight's values at the positions (K,)."""
        if self.fingerprint is not None and base_fingerprint(base) != self.fingerprint:
            raise BaseMismatchError(f"adapter layer {self.name!r} was trained on another base than {what}: the "
                                    "weights at its tuned positions differ (base fingerprint mismatch); serve it on "
                                    "the model it was trained on")

    def merged_into(self, weight: torch.Tensor) -> torch.Tensor:
        """A copy of ``weight`` (out, in) holding cast(base + v) at the positions, as merge_and_unload writes."""
        merged = weight.clone()
        base = weight.reshape(-1)[self.indices]
        scatter_merge_(merged, self.indices, base, self.values.to(weight.device))
        return merged


def read_sparse_adapter(folder: str) -> dict[str, LayerDeltas]:
    """The active adapter of an APET folder (PEFT's layout or the in-place one), by target layer name."""
    saved = read_folder(folder)
    saved.check_one_save()
    if len(saved.active) != 1:
        raise AdapterFileError(f"{folder} holds {len(saved.active)} active adapters ({saved.active}); a server "
                               "applies one adapter per request: save each adapter in a folder of its own")
    adapter = saved.adapters[saved.active[0]]
    if saved.others:
        raise AdapterFileError(f"{folder} also holds full modules ({sorted(saved.others)[:3]}, modules_to_save): "
                               "a server applies only sparse deltas to linear layers; merge this adapter instead")
    layers = {}
    for name, info in adapter.config.layers.items():
        shape = tuple(int(n) for n in info["shape"])
        idx = saved_positions(adapter, name, saved.path)
        layers[name] = LayerDeltas(name, shape, idx.long(), adapter.values[name], info.get("base_fingerprint"))
    return layers


_SAFETENSORS_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, torch.bfloat16),
                       "F64": (np.float64, None)}


@functools.lru_cache(maxsize=64)
def _header(path: str, mtime_ns: int, size: int) -> tuple[int, dict]:
    """A safetensors file's header (and its length), read once per file version."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise AdapterFileError(f"{path} is not a safetensors file (a header of {length} bytes in a file of "
                                       f"{size})")
            return length, json.loads(f.read(length))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path} is not a safetensors file ({exc})") from None


def checkpoint_values(model_dir: str, key: str, indices: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``key`` of a safetensors checkpoint folder at flat ``indices``, read from the file memory-mapped (only
    the pages holding the positions are read; a server has the weights it loaded in other layouts); None where no
    file holds the key. Where a server repacks its weights as they load, this is how the base is checked."""
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        stat = os.stat(path)
        length, header = _header(path, stat.st_mtime_ns, stat.st_size)
        entry = header.get(key)
        if entry is None:
            continue
        np_dtype, view = _SAFETENSORS_DTYPES.get(entry["dtype"], (None, None))
        if np_dtype is None:
            raise AdapterFileError(f"{path}: {key} is stored as {entry['dtype']}, not a float weight an adapter applies to")
        start, end = entry["data_offsets"]
        numel = int(np.prod(entry["shape"]))
        if end - start != numel * np.dtype(np_dtype).itemsize or 8 + length + end > stat.st_size:
            raise AdapterFileError(f"{path}: {key}'s bytes do not hold a {entry['dtype']} tensor of shape "
                                   f"{entry['shape']}: a damaged checkpoint")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise BaseMismatchError(f"positions outside {key} ({entry['shape']} in {path}): a folder for another "
                                    "model?")
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length + start, shape=(end - start,)).view(np_dtype)
        values = torch.from_numpy(np.ascontiguousarray(data[indices.numpy()]))
        return values.view(view) if view is not None else values
    return None
