"""One external-data file for every graph of an artifact, written as the graphs are built.

Each tensor is written once, 4096-byte aligned (so ONNX Runtime can memory-map it), the moment a
graph first reads it; every graph that reads it points at the same offset (a draft's
external-data entries are a subset of the full graph's). Only names, shapes and offsets stay in
memory, so a build holds one tensor at a time however large the model (with a model streamed from
its files: models.loader.load_model(lazy=True)).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096


@dataclass(frozen=True)
class StoredTensor:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    length: int  # bytes


@dataclass
class WeightStore:
    """Named weight arrays shared by every graph of one artifact, each written once to ``file``."""

    file: BinaryIO
    entries: dict[str, StoredTensor] = field(default_factory=dict)

    def add(self, name: str, array: np.ndarray) -> str:
        if name not in self.entries:
            data = np.ascontiguousarray(array)
            self.file.write(b"\0" * (-self.file.tell() % ALIGN))
            self.entries[name] = StoredTensor(data.dtype, data.shape, self.file.tell(), data.nbytes)
            self.file.write(data.reshape(-1).view(np.uint8))
        return name

    def __contains__(self, name: str) -> bool:
        return name in self.entries


@contextmanager
def weights_file(path: Path) -> Iterator[WeightStore]:
    """A WeightStore writing into ``path`` (created or truncated), closed on exit."""
    with open(path, "wb") as f:
        yield WeightStore(f)


def attach_external(model: onnx.ModelProto, names: Iterable[str], store: WeightStore, location: str) -> None:
    """Declare ``names`` as initializers of ``model`` whose bytes live in ``location``."""
    for name in sorted(names):
        entry = store.entries[name]
        tensor = TensorProto(
            name=name, data_type=helper.np_dtype_to_tensor_dtype(entry.dtype), dims=list(entry.shape)
        )
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", entry.offset), ("length", entry.length)):
            tensor.external_data.add(key=key, value=str(value))
        model.graph.initializer.append(tensor)
