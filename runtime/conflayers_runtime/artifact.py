"""Reading a built artifact: file integrity, the I/O contract, and ONNX Runtime sessions.

The ``artifacts`` section of the manifest (written by ``conflayers-export build``) is typed by
:class:`~conflayers_runtime.manifest.Artifacts`: graph and weights files, the KV-cache layout,
the layers each graph runs, where each tensor lies in the weights file, the tokenizer and the
size and sha256 of every file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import DeviceError, ManifestError, SessionOptionError
from .manifest import CAPTURABLE_TREE, Artifacts, Manifest
from .onnx_backend import PROVIDERS, KVSpec, OnnxBackend


def artifact_section(manifest: Manifest) -> Artifacts:
    """The manifest's artifacts section (checked field by field when the manifest was read)."""
    if manifest.artifacts is None:
        raise ManifestError(
            "the manifest describes no built artifact (no artifacts section): "
            "run `conflayers-export build` on this folder"
        )
    return manifest.artifacts


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
    for name, entry in artifact_section(manifest).files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry.size:
            problems.append(f"{name} has {path.stat().st_size} bytes, expected {entry.size}")
        elif file_sha256(path) != entry.sha256:
            problems.append(f"{name} does not match its sha256")
    if problems:
        raise ManifestError(
            f"artifact {folder} is damaged: {'; '.join(problems)}. Rebuild it with `conflayers-export build`"
        )


def kv_spec(manifest: Manifest) -> KVSpec:
    section = artifact_section(manifest)
    kv = section.kv
    return KVSpec(
        kv.num_layers, kv.num_kv_heads, kv.head_dim, section.max_seq_len, kv.dtype, kv.min_attention_rows
    )


def full_pass_rows(section: Artifacts, device: str) -> int:
    """How many rows a full-graph pass must have: the fewest that make every row bitwise equal to
    the same row of any other pass, so that greedy speculation equals plain decoding (DESIGN.md,
    row invariance). The runtime pads shorter passes to it (onnx_backend.py); on CUDA it is also
    the most rows an exact pass may have (OnnxBackend.max_full_pass_rows).

    CPU (measured): everything but GroupQueryAttention computes a row alike for any row count
    (MatMul, Gemm, the norms, and MatMulNBits with int8 activations given equal inputs); its
    one-row pass goes through MLAS' M == 1 kernel. Graphs built since ``kv.min_attention_rows``
    exists run a one-token pass's attention over two rows themselves and need no padding; older
    ones get two-row passes. CUDA (from ONNX Runtime's kernel selection, not yet measured on a
    GPU): attention and cuBLAS pick kernels by the row count (XQA at one row, cuDNN per row
    count, flash splits by length), so every pass after the prompt gets one fixed count.
    """
    if device == "cuda":
        return 16
    return 1 if section.kv.min_attention_rows >= 2 else 2


# "paired": one session over the artifact's paired graph (the full model and the draft as If
# branches): every weight loaded and prepacked once (CPU default where the artifact has one and
# the draft reads the full graph's weights).
# "prepacked": a session per graph, each with its own prepacked copy of the weights it reads (a
# layer-skip pair takes ~1.8x the memory of the full graph alone). "shared": both sessions read
# the weights file through one memory map without copies, but ONNX Runtime then repacks every
# weight on each multi-token call (verify passes ~3x slower) and quantized drafts run ~10x slower
# unpacked (docs/BENCHMARKS.md).
WEIGHT_MODES = ("paired", "prepacked", "shared")


def session_options(
    threads: int | None = None, weights: str = "prepacked", two_sessions: bool = True
) -> ort.SessionOptions:
    if weights not in WEIGHT_MODES:
        raise SessionOptionError(f"unknown weights mode {weights!r}: use one of {', '.join(WEIGHT_MODES)}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if two_sessions:
        # Threads still spin inside a run (fast) but stop when it ends: otherwise the idle session's
        # spinning pool steals the cores from the other one (measured: speculation 22 -> 40 tok/s).
        # A lone session (the full graph, or a paired one) keeps ONNX Runtime's default (spinning
        # between runs).
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if weights == "shared":
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def providers_for(device: str, cuda_graphs: bool = False) -> list:
    if device not in PROVIDERS:
        raise DeviceError(f"unknown device {device!r}: use one of {', '.join(PROVIDERS)}")
    if PROVIDERS[device] not in ort.get_available_providers():
        raise DeviceError(
            f"device {device!r} needs {PROVIDERS[device]}, which this onnxruntime build lacks "
            "(for cuda: pip uninstall onnxruntime && pip install onnxruntime-gpu)"
        )
    if device == "cpu":
        return [PROVIDERS["cpu"]]
    # TF32 would round fp32 matrix products to 10-bit mantissas: an fp32 artifact computes in fp32.
    options = {"use_tf32": "0"}
    if cuda_graphs:
        options["enable_cuda_graph"] = "1"
    return [(PROVIDERS[device], options), "CPUExecutionProvider"]


def open_backend(
    folder: str | os.PathLike[str],
    manifest: Manifest,
    draft: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    weights: str | None = None,
    exact: bool = True,
    capturable: bool | None = None,
    tree: bool = False,
) -> OnnxBackend:
    """Sessions for the full graph and (optionally) one draft, over shared device-resident caches.

    ``exact`` pads every full-graph pass to the device's :func:`full_pass_rows` (onnx_backend.py),
    so that speculative output equals plain output bitwise; False decodes plain steps one row at a
    time (faster plain decoding, which may then differ from speculative output at near-ties).

    ``weights`` (WEIGHT_MODES): by default "paired" on CPU where the artifact has a paired graph
    for the draft and the draft reads the full graph's weights (base precision; fp32 artifacts,
    see _pairs_by_default), else
    "prepacked": a draft of int8/int4 copies reads its own weights, so one session saves nothing
    (the embeddings, a shared memory map, count once either way) and its If costs 0.15-0.3 ms a
    call (measured on SmolLM2: a draft pass 5.8 ms paired, 5.5-5.7 ms alone). On CUDA the
    default is "prepacked": each session holds the weights its graph reads in GPU memory (the
    draft's a second time, where it reads the full graph's); "paired" holds them once but is not
    yet measured on a GPU (DESIGN.md).

    ``capturable``: run the artifact's capturable graphs (lengths as an input, fixed shapes), which
    on CUDA are captured in CUDA graphs (onnx_backend.py). Default: on CUDA where the artifact has
    them (fp16 and int4-fp16 artifacts since schema 1.3); on the CPU they run uncaptured, which
    only tests serve.

    ``tree``: the full graph in its tree form (tree.full.onnx: verify passes may hold a token tree,
    tree.py); "paired" then opens it paired with the draft (tree.paired.<draft>.onnx, the CPU
    default as above), capturable its capturable form (artifacts.capturable["tree.full"]).
    """
    folder = Path(folder)
    section = artifact_section(manifest)
    if tree and "full" not in section.tree:
        raise ManifestError(
            f"{folder} has no tree graph (written since schema 1.4): rebuild it with "
            "`conflayers-export build`, or open it without tree=True"
        )
    if draft is not None and draft not in section.drafts:
        known = ", ".join(section.drafts) or "none"
        raise ManifestError(f"the artifact has no draft graph {draft!r} (built drafts: {known})")
    full_role = CAPTURABLE_TREE if tree else "full"
    roles = [full_role] if draft is None else [full_role, draft]
    capturable = _capturable(folder, section, roles, device, weights, capturable)
    providers = providers_for(device, cuda_graphs=capturable and device == "cuda")
    paired_file = (section.tree if tree else section.paired).get(draft) if draft is not None else None
    weights = _weights_mode(folder, manifest, draft, device, weights, capturable, paired_file)
    _check_device(folder, manifest, device, weights)
    if capturable:
        files = section.capturable
    else:
        files = {**section.drafts, full_role: section.tree["full"] if tree else section.full}
    if weights == "paired":
        graphs = {"paired": paired_file}
    else:
        graphs = {"full": files[full_role]} | ({"draft": files[draft]} if draft else {})
    sessions = _open_sessions(folder, manifest, draft, graphs, device, providers, threads, weights)
    vocab_tensor = section.draft_vocab.get(draft) if draft is not None else None
    token_ids = _read_weight(folder, section, vocab_tensor) if vocab_tensor else None
    full = sessions.get("full") or sessions["paired"]
    draft_session = sessions["paired"] if weights == "paired" else sessions.get("draft")
    cuda_graphs = capturable and device == "cuda"
    pass_rows = full_pass_rows(section, device) if exact else 1
    return OnnxBackend(full, draft_session, kv_spec(manifest), device, token_ids, pass_rows, cuda_graphs)


def _capturable(
    folder: Path, section: Artifacts, roles: list[str], device: str, weights: str | None, asked: bool | None
) -> bool:
    """Whether to open the capturable graphs of ``roles``: as asked, else on CUDA where they exist."""
    has_capturable = all(role in section.capturable for role in roles)
    if asked is None:  # an explicit weights="paired" asks for the If graph, which is not capturable
        return device == "cuda" and has_capturable and weights != "paired"
    if asked and not has_capturable:
        raise ManifestError(
            f"{folder} has no capturable graphs for {' and '.join(roles)} (written for fp16 and "
            "int4-fp16 artifacts since schema 1.3, the tree graph's since 1.4): rebuild it with "
            "`conflayers-export build`, or open it with capturable=False"
        )
    return asked


def _weights_mode(
    folder: Path,
    manifest: Manifest,
    draft: str | None,
    device: str,
    weights: str | None,
    capturable: bool,
    paired_file: str | None,
) -> str:
    """The WEIGHT_MODES entry asked for, or the default (see open_backend), checked against the
    graphs the artifact has."""
    pairs = paired_file and device == "cpu" and not capturable and _pairs_by_default(manifest, draft)
    weights = weights or ("paired" if pairs else "prepacked")
    if capturable and weights == "paired":
        raise SessionOptionError(
            'capturable graphs run in two sessions (a CUDA graph cannot hold an If): use weights="prepacked"'
        )
    if weights not in WEIGHT_MODES:
        raise SessionOptionError(f"unknown weights mode {weights!r}: use one of {', '.join(WEIGHT_MODES)}")
    if weights == "paired" and not paired_file:
        raise ManifestError(
            f"{folder} has no paired graph for draft {draft!r} (built before schema 1.2, or no draft): "
            'rebuild it with `conflayers-export build`, or use weights="prepacked"'
        )
    return weights


def _check_device(folder: Path, manifest: Manifest, device: str, weights: str) -> None:
    """Refuse what ``device`` cannot run correctly."""
    if device == "cuda" and kv_spec(manifest).dtype != "fp16":
        # Measured on an H200 (onnxruntime-gpu 1.31): CUDA has no fp32 GroupQueryAttention kernel,
        # so attention falls back to the CPU behind copies of the caches, which breaks the shared
        # past/present buffers: every step after the prompt is wrong.
        raise DeviceError(
            f"{folder} is a {artifact_section(manifest).dtype} artifact (fp32 activations), which ONNX "
            "Runtime cannot run correctly on CUDA: rebuild it with --dtype fp16 or --dtype int4-fp16 for CUDA"
        )
    if device != "cpu" and weights == "shared":
        raise DeviceError(
            'weights="shared" is a CPU mode (one memory map): on CUDA use the default ("prepacked")'
        )


def _open_sessions(
    folder: Path,
    manifest: Manifest,
    draft: str | None,
    graphs: dict[str, str],
    device: str,
    providers: list,
    threads: int | None,
    weights: str,
) -> dict[str, ort.InferenceSession]:
    """One session per role of ``graphs`` ("full", "draft" or "paired"); a graph the device's
    ONNX Runtime cannot run is a DeviceError naming it."""
    sessions = {}
    for role, graph in graphs.items():
        options = session_options(threads, weights, two_sessions=len(graphs) > 1)
        try:
            sessions[role] = ort.InferenceSession(str(folder / graph), options, providers=providers)
        except Exception as exc:  # e.g. a quantized kernel this build of ONNX Runtime lacks
            precision = next((d.weight_precision for d in manifest.drafts if d.name == draft), "base")
            what = {
                "draft": f"draft {draft!r} ({precision} weights)",
                "paired": f"paired graph of draft {draft!r} ({precision} weights)",
            }.get(role, f"{artifact_section(manifest).dtype} full graph")
            raise DeviceError(
                f"ONNX Runtime cannot run the {what} of {folder} on {device}: {exc}. Choose another "
                "draft (--draft) or device, or rebuild the artifact with a precision this device runs"
            ) from exc
    return sessions


def _pairs_by_default(manifest: Manifest, draft: str | None) -> bool:
    """Whether the CPU default for ``draft`` is the paired session: where the draft reads the full
    graph's weights (base precision; a draft of int8/int4 copies reads its own), and the artifact
    is a CPU one (fp32 activations). An fp16 artifact's If branch computes the full model otherwise
    than full.onnx alone on the CPU (measured on SmolLM2: greedy output parts at the third token),
    while fp32 branches are bitwise the graph alone (tests/test_paired.py)."""
    known = {d.name: d for d in manifest.drafts}
    base = draft in known and known[draft].weight_precision == "base"
    return base and artifact_section(manifest).kv.dtype == "fp32"


_NUMPY_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int64": np.int64,
    "uint8": np.uint8,
    "int8": np.int8,
}


def _read_weight(folder: Path, section: Artifacts, name: str) -> np.ndarray:
    """One tensor of the weights file, as a host array (a copy: the file is closed afterwards)."""
    entry = section.weights_index[name]
    mapped = np.memmap(
        folder / section.weights, dtype=np.uint8, mode="r", offset=entry.offset, shape=(entry.length,)
    )
    return np.array(mapped.view(_NUMPY_DTYPES[entry.dtype]).reshape(entry.shape))
