"""One external-data file for every graph of an artifact.

Each tensor is written once, 4096-byte aligned (so ONNX Runtime can memory-map it), and every
graph that reads it points at the same offset: a draft's external-data entries are a subset of
the full graph's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096


def write_weights(arrays: dict[str, np.ndarray], path: Path) -> dict[str, tuple[int, int]]:
    """Write the arrays into ``path``; returns name -> (offset, length in bytes)."""
    offsets: dict[str, tuple[int, int]] = {}
    with open(path, "wb") as f:
        for name, array in arrays.items():
            pad = -f.tell() % ALIGN
            f.write(b"\0" * pad)
            data = np.ascontiguousarray(array).tobytes()
            offsets[name] = (f.tell(), len(data))
            f.write(data)
    return offsets


def attach_external(
    model: onnx.ModelProto,
    names: Iterable[str],
    arrays: dict[str, np.ndarray],
    offsets: dict[str, tuple[int, int]],
    location: str,
) -> None:
    """Declare ``names`` as initializers of ``model`` whose bytes live in ``location``."""
    for name in sorted(names):
        array = arrays[name]
        tensor = TensorProto(
            name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape)
        )
        tensor.data_location = TensorProto.EXTERNAL
        offset, length = offsets[name]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        model.graph.initializer.append(tensor)
