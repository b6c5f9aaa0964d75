"""Reading a built artifact: file integrity, the I/O contract, and ONNX Runtime sessions.

The ``artifacts`` section of the manifest (written by ``conflayers-export build``) holds::

    dtype, max_seq_len, weights (file name), full (graph file), drafts {name: graph file},
    files {name: {size, sha256}}, kv {num_layers, num_kv_heads, head_dim},
    layers {"full": [...], "<draft>": [kept layer indices]}, inputs/outputs (name patterns),
    tokenizer {file, chat_prefix, chat_suffix, stop_token_ids}
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .errors import ManifestError
from .manifest import Manifest
from .onnx_backend import PROVIDERS, KVSpec, OnnxBackend

REQUIRED = ("dtype", "max_seq_len", "weights", "full", "drafts", "files", "kv", "layers", "tokenizer")


def artifact_section(manifest: Manifest) -> dict[str, Any]:
    section = manifest.artifacts
    missing = [key for key in REQUIRED if key not in section]
    if missing:
        raise ManifestError(
            f"the manifest describes no built artifact (missing {', '.join(missing)}): "
            "run `conflayers-export build` on this folder"
        )
    return section


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def verify_files(folder: str | os.PathLike[str], manifest: Manifest) -> None:
    """Check every listed file's size and sha256; raise ManifestError naming each bad file."""
    folder = Path(folder)
    problems = []
    for name, entry in artifact_section(manifest)["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, expected {entry['size']}")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{name} does not match its sha256")
    if problems:
        raise ManifestError(
            f"artifact {folder} is damaged: {'; '.join(problems)}. Rebuild it with `conflayers-export build`"
        )


def kv_spec(manifest: Manifest) -> KVSpec:
    section = artifact_section(manifest)
    kv = section["kv"]
    return KVSpec(
        kv["num_layers"], kv["num_kv_heads"], kv["head_dim"], section["max_seq_len"], section["dtype"]
    )


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return options


def providers_for(device: str) -> list[str]:
    if device not in PROVIDERS:
        raise ManifestError(f"unknown device {device!r}: use one of {', '.join(PROVIDERS)}")
    if PROVIDERS[device] not in ort.get_available_providers():
        raise ManifestError(
            f"device {device!r} needs {PROVIDERS[device]}, which this onnxruntime build lacks "
            "(for cuda: pip uninstall onnxruntime && pip install onnxruntime-gpu)"
        )
    return [PROVIDERS[device], "CPUExecutionProvider"] if device != "cpu" else [PROVIDERS["cpu"]]


def open_backend(
    folder: str | os.PathLike[str],
    manifest: Manifest,
    draft: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> OnnxBackend:
    """Sessions for the full graph and (optionally) one draft, over shared device-resident caches."""
    folder = Path(folder)
    section = artifact_section(manifest)
    providers = providers_for(device)
    options = session_options(threads)

    def session(graph: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(folder / graph), options, providers=providers)

    draft_session = None
    if draft is not None:
        if draft not in section["drafts"]:
            known = ", ".join(section["drafts"]) or "none"
            raise ManifestError(f"the artifact has no draft graph {draft!r} (built drafts: {known})")
        draft_session = session(section["drafts"][draft])
    return OnnxBackend(session(section["full"]), draft_session, kv_spec(manifest), device)
