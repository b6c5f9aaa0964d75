"""The manifest: the contract between calibrate, build and any runtime (ours or a user's).

``manifest.json`` is plain JSON so that a driver in another language can read it. Its schema is
versioned ``MAJOR.MINOR``: a reader accepts any minor version of the major version it knows
(new optional fields) and refuses another major version with a message naming the fix.

A *draft* is described by what makes it cheaper than the full model: the decoder layers it
skips, and (open for later kinds of drafts) a pruned output vocabulary and the precision of the
weights it reads. Tasks map a name (e.g. ``default``, ``code``) to the draft chosen for it, or
to none when speculation is not recommended for that task.

The ``artifacts`` section (written by ``conflayers-export build``) and calibrate's vocabulary
ranking are typed (:class:`Artifacts`, :class:`VocabularyRanking`) and type-checked on read,
field by field: an error names the field (``artifacts.kv.head_dim``) and the fix. Their JSON
layout is the one drivers in other languages read (``examples/driver.py``), so the dataclasses
mirror it key for key and ``Manifest.to_dict`` of a manifest read from disk gives back the
file's JSON (an older artifacts section reads back with the defaults of the fields it lacked).
Keys a reader does not know are ignored (a newer minor version's optional fields).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Union, get_args, get_origin, get_type_hints

from .errors import ManifestError, SkipSetError

# 1.6: a draft's fixed-length draft length; 1.5: lookup drafting per task; 1.4: tree graphs;
# 1.3: capturable graphs; 1.2: paired graphs; 1.1: draft length policy, pruned-vocabulary and
# quantized drafts built
SCHEMA_VERSION = "1.6"
MANIFEST_NAME = "manifest.json"
# The key of artifacts.capturable that names the tree graph in capturable form.
CAPTURABLE_TREE = "tree.full"
WEIGHT_PRECISIONS = ("base", "int8", "int4")  # "base" = the artifact's own precision
_REBUILD = "rebuild the artifact with `conflayers-export build`"
_RECALIBRATE = "run `conflayers-export calibrate` again"


@dataclass(frozen=True)
class ArtifactDtype:
    """What an artifact dtype (``build --dtype``) means for its graphs."""

    activations: str  # "fp32" or "fp16": the graphs' float dtype, and the KV caches'
    weight_bits: int | None  # 4: the linears are MatMulNBits int4 weights; None: float weights


# The artifact dtypes: the one list the builder (export/graph.py), the CLI and this reader use.
ARTIFACT_DTYPES: dict[str, ArtifactDtype] = {
    "fp32": ArtifactDtype("fp32", None),
    "fp16": ArtifactDtype("fp16", None),
    "int4": ArtifactDtype("fp32", 4),  # CPU
    # CUDA: its GroupQueryAttention kernels take fp16 only (fp32 graphs fall back to CPU attention).
    "int4-fp16": ArtifactDtype("fp16", 4),
}


def _omitted_when_none() -> Any:
    """An optional field that older writers left out: absent from the JSON while None, so that a
    manifest they wrote reads back to the same dict."""
    return field(default=None, metadata={"omit_if_none": True})


@dataclass
class ModelIdentity:
    source: str  # what the user passed to --model (packaged name, file or folder)
    architecture: str  # transformers model_type, e.g. "llama"
    num_layers: int
    fingerprint: str  # "sha256:<hex>" of the source weights


@dataclass
class Draft:
    name: str
    skip_layers: list[int | str]  # layers, and "<layer>.attention" / "<layer>.mlp" blocks (SkipPlan)
    vocab_size: int | None = None  # None: full vocabulary
    weight_precision: str = "base"
    # How long it drafts (the runtime's DraftConfig): calibrate picks these per draft, since an
    # accurate draft pays for longer drafts and a weak one does not. None: the runtime's defaults.
    max_draft_tokens: int | None = None
    confidence_threshold: float | None = None
    # Token trees (the runtime's TreeConfig: alternative rows per verify pass, runners-up offered
    # per drafted token), where calibrate found them faster than a chain on its device. None: a
    # chain. Absent before schema 1.4.
    tree_nodes: int | None = _omitted_when_none()
    tree_width: int | None = _omitted_when_none()
    # The draft length for a decoding loop that drafts that many tokens every cycle, with no
    # confidence stop (onnxruntime-genai's draft-model mode: build's genai_speculative.json), where
    # calibrate picked one; it is shorter than max_draft_tokens, since every draft pass is paid
    # for. None: max_draft_tokens. Absent before schema 1.6.
    fixed_length_tokens: int | None = _omitted_when_none()
    # Measured on the calibration set: acceptance_rate, mean_tokens_per_cycle, c_draft,
    # expected_speedup... Free-form so that new metrics need no schema change.
    metrics: dict[str, Any] = field(default_factory=dict)
    recommended: bool = True


@dataclass
class Lookup:
    """Lookup drafting as calibrated for a task (the runtime's LookupConfig, lookup.py): proposals
    read from the text itself, continuing the latest earlier match of its last n tokens."""

    min_ngram: int
    max_ngram: int
    max_draft_tokens: int


# What proposes in a task's speculative cycles (Task.source).
SOURCES = ("model", "lookup", "both", "none")


@dataclass
class Task:
    # The model draft: name of a Draft, or None (no model draft: speculation is not recommended,
    # or proposals come from the lookup alone).
    draft: str | None
    note: str = ""
    # Proposals read from the text, alone (draft None: the text's continuation is proposed as it
    # is) or beside the model draft ("both": each draft pass also reads the text's guess and keeps
    # what the draft itself chooses). Absent before schema 1.5 (readers before it decode such a
    # task with its draft, or plainly).
    lookup: Lookup | None = _omitted_when_none()
    # What calibrate measured for the task's sources together, where a lookup is part of them:
    # acceptance_rate, mean_tokens_per_cycle, expected_speedup... (a model draft alone keeps its
    # measurements in Draft.metrics). Absent before schema 1.5.
    metrics: dict[str, Any] | None = _omitted_when_none()

    @property
    def source(self) -> str:
        """One of SOURCES: the model draft, the lookup, both, or none (plain decoding)."""
        if self.lookup is None:
            return "none" if self.draft is None else "model"
        return "lookup" if self.draft is None else "both"


@dataclass
class VocabularyRanking:
    """Calibrate's ranking of the vocabulary (``calibration.vocabulary`` in the JSON): stop tokens,
    then tokens by frequency in its calibration generations. A pruned draft of N tokens scores the
    N first ids (``export/build.py``)."""

    ranked_token_ids: list[int]
    source: str | None = _omitted_when_none()  # how the ranking was made, for the reader


@dataclass
class Quantization:
    """How quantized weights are stored (``export/quantize.py``)."""

    operator: str  # "com.microsoft.MatMulNBits"
    scheme: str  # in words, e.g. asymmetric round-to-nearest per block
    block_size: int
    # ONNX Runtime's MatMulNBits accuracy_level per kind of graph: {"full": 4, "drafts": 4}
    # (4: int8 activations); a plain map, as drivers read it.
    accuracy_level: dict[str, int]


KV_SHAPE = ("batch", "num_kv_heads", "max_seq_len", "head_dim")


@dataclass(kw_only=True)  # keyword-only: the fields keep the JSON's key order, defaults or not
class CacheLayout:
    """The ``kv`` section: every layer's past/present buffer is [batch, num_kv_heads,
    max_seq_len, head_dim] of ``dtype``, bound as past and present at once."""

    dtype: str  # "fp32" or "fp16"; absent in schema 1.0, which had float artifacts only: the artifact's
    num_layers: int
    num_kv_heads: int
    head_dim: int
    sliding_windows: list[int | None]  # per layer; None = full attention
    shape: list[str] = field(default_factory=lambda: list(KV_SHAPE))
    past_is_present: bool = True
    # Cache positions every full-graph pass writes: full graphs that run a one-token pass's
    # attention over its row twice (row invariance) say 2; absent (graphs built before that) means
    # 1. Draft graphs pad nothing (their rows need not be invariant), so a
    # draft pass writes at most this many.
    min_attention_rows: int = 1


class WeightEntry(NamedTuple):
    """Where a tensor lies in the weights file. A named tuple because the JSON stores it as the
    4-item list ``[dtype, shape, offset, length]`` (compact for hundreds of tensors, and what
    drivers index); it unpacks like that list and reads as attributes here."""

    dtype: str  # numpy name, e.g. "float32", "uint8", "int64"
    shape: list[int]
    offset: int  # bytes from the start of the file
    length: int  # bytes


@dataclass
class FileEntry:
    """Size and sha256 of one file of the artifact (``load`` and ``validate`` check both)."""

    size: int
    sha256: str


@dataclass
class TokenizerFiles:
    """The tokenizer file, the model's Jinja chat template, and that template rendered around one
    user turn (what older runtimes read: no Jinja needed)."""

    file: str
    chat_prefix: str | None = None  # None: the model has no usable chat template
    chat_suffix: str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    chat_template: str | None = _omitted_when_none()  # absent in artifacts built before it was carried


@dataclass(kw_only=True)  # keyword-only: the fields keep the JSON's key order, defaults or not
class Artifacts:
    """The ``artifacts`` section: the files ``build`` wrote and the I/O contract a driver needs
    (DESIGN.md, "Graph I/O"). Graph files are named relative to the artifact folder."""

    dtype: str  # a key of ARTIFACT_DTYPES
    max_seq_len: int
    weights: str  # the one weights file every graph points into
    full: str  # the full graph
    drafts: dict[str, str]  # draft name -> its graph
    # Drafts with a pruned vocabulary: the int64 tensor (in weights_index) mapping each of their
    # logits columns to a token id. Absent in schema 1.0.
    draft_vocab: dict[str, str] = field(default_factory=dict)
    # Draft name -> one graph holding the full model and that draft as the branches of an If on a
    # use_draft input, over the same weights: one session loads and prepacks them once (CPU
    # default). Absent before schema 1.2.
    paired: dict[str, str] = field(default_factory=dict)
    # "full" or a draft name -> the same graph in capturable form (lengths as a seqlens_k input,
    # fixed shapes per pass: CUDA graphs, docs/gpu/CUDA_GRAPHS.md); "tree.full" (CAPTURABLE_TREE):
    # the tree graph's. Written for fp16-activation (CUDA) artifacts. Absent before schema 1.3.
    capturable: dict[str, str] = field(default_factory=dict)
    # "full" -> the full graph with position_ids and attention_bias inputs: a verify pass over a
    # token tree (docs/TOKEN_TREES.md); a draft name -> that graph paired with the draft (as in
    # ``paired``). Absent before schema 1.4.
    tree: dict[str, str] = field(default_factory=dict)
    quantization: Quantization | None = _omitted_when_none()  # absent in schema 1.0
    kv: CacheLayout
    layers: dict[str, list[int]]  # "full" or a draft name -> the decoder layers its graph runs
    # Where each weight lives in the weights file, and which graph reads which: enough for a
    # runtime to hand both sessions the same device-resident tensors.
    weights_index: dict[str, WeightEntry] = field(default_factory=dict)
    graph_weights: dict[str, list[str]] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # name pattern -> description
    outputs: dict[str, str] = field(default_factory=dict)
    tokenizer: TokenizerFiles
    files: dict[str, FileEntry]  # every file of the artifact but the manifest

    @classmethod
    def from_dict(cls, data: object) -> Artifacts:
        """The section as read from JSON, type-checked; ManifestError names a bad field."""
        section = cls.read(data, _Reader())
        if section is None:
            raise ManifestError(f"the manifest's artifacts section is empty: {_REBUILD}")
        return section

    @classmethod
    def read(cls, data: object, reader: _Reader) -> Artifacts | None:
        """The section through ``reader`` (which collects unknown keys); None where it is absent or
        empty (not built yet)."""
        if not data:
            return None
        if isinstance(data, dict) and isinstance(data.get("kv"), dict) and "dtype" not in data["kv"]:
            data = {**data, "kv": {**data["kv"], "dtype": data.get("dtype")}}  # schema 1.0
        reader.fix = _REBUILD
        return reader.typed(cls, data, "artifacts")

    def check(self, draft_names: list[str], num_layers: int) -> None:
        """What types cannot say: known dtypes, and names that point at drafts, layers, tensors
        and files that exist. Raises ManifestError naming the field and the fix."""
        if self.dtype not in ARTIFACT_DTYPES:
            _refuse(f"artifacts.dtype {self.dtype!r} is not one of {', '.join(ARTIFACT_DTYPES)}")
        if self.kv.dtype != ARTIFACT_DTYPES[self.dtype].activations:
            _refuse(
                f"artifacts.kv.dtype {self.kv.dtype!r} does not match a {self.dtype} artifact "
                f"(whose caches are {ARTIFACT_DTYPES[self.dtype].activations})"
            )
        for name in self.drafts:
            if name not in draft_names:
                _refuse(f"artifacts.drafts names draft {name!r}, which the manifest's drafts list lacks")
        for name, tensor in self.draft_vocab.items():
            if name not in self.drafts:
                _refuse(f"artifacts.draft_vocab names draft {name!r}, which has no graph in artifacts.drafts")
            if tensor not in self.weights_index:
                _refuse(f"artifacts.draft_vocab.{name} names tensor {tensor!r}, absent from weights_index")
        for name in self.paired:
            if name not in self.drafts:
                _refuse(f"artifacts.paired names draft {name!r}, which has no graph in artifacts.drafts")
        for name in self.capturable:
            if name not in ("full", CAPTURABLE_TREE) and name not in self.drafts:
                _refuse(
                    f"artifacts.capturable names graph {name!r}, which is neither 'full', "
                    f"{CAPTURABLE_TREE!r} nor a draft"
                )
        for name in self.tree:
            if name != "full" and name not in self.drafts:
                _refuse(f"artifacts.tree names graph {name!r}, which is neither 'full' nor a draft")
        for graph, kept in self.layers.items():
            if graph != "full" and graph not in self.drafts:
                _refuse(f"artifacts.layers names graph {graph!r}, which is neither 'full' nor a draft")
            if any(not 0 <= i < num_layers for i in kept):
                _refuse(f"artifacts.layers.{graph} has layers outside 0..{num_layers - 1}: {kept}")
        forms = (*self.paired.values(), *self.capturable.values(), *self.tree.values())
        for graph in (self.weights, self.full, *self.drafts.values(), *forms):
            if graph not in self.files:
                _refuse(f"artifacts.files does not list {graph} (its size and sha256)")
        kv = self.kv
        for name, value in (
            ("max_seq_len", self.max_seq_len),
            ("kv.num_layers", kv.num_layers),
            ("kv.num_kv_heads", kv.num_kv_heads),
            ("kv.head_dim", kv.head_dim),
            ("kv.min_attention_rows", kv.min_attention_rows),
        ):
            if value < 1:
                _refuse(f"artifacts.{name} must be >= 1, got {value}")


@dataclass
class Manifest:
    """Everything ``manifest.json`` holds: the model, its drafts, which task uses which, what
    calibrate recorded, and (once built) the artifact's files and I/O contract."""

    model: ModelIdentity
    drafts: list[Draft] = field(default_factory=list)
    tasks: dict[str, Task] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # settings, prompts per task (free-form)
    # Stored in the JSON as calibration.vocabulary (see to_dict); None: calibrate ranked none.
    vocabulary: VocabularyRanking | None = None
    artifacts: Artifacts | None = None  # files, I/O contract; None: not built yet ({} in the JSON)
    tool: dict[str, str] = field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION
    # Keys the file holds that this reader does not know (a newer minor version's fields), as paths
    # like "drafts[0].source": read past, never written back; `conflayers-export validate` lists them.
    unknown_keys: list[str] = field(
        default_factory=list, compare=False, repr=False, metadata={"derived": True}
    )

    def draft(self, name: str) -> Draft:
        for d in self.drafts:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.drafts) or "none"
        raise ManifestError(f"the manifest has no draft named {name!r} (drafts: {known})")

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON, in the layout every reader knows."""
        data = _plain(self)
        vocabulary = data.pop("vocabulary")
        if vocabulary is not None:
            data["calibration"]["vocabulary"] = vocabulary
        data["artifacts"] = data["artifacts"] or {}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """The manifest as read from JSON: every section type-checked field by field (a bad field
        is a ManifestError naming it and the fix); keys of a newer minor version that this reader
        does not know are ignored and listed in ``unknown_keys``."""
        _check_version(data.get("schema_version"))
        reader = _Reader()
        calibration = reader.section(data, "calibration", dict[str, Any], {})
        vocabulary = calibration.pop("vocabulary", None)
        manifest = cls(
            model=reader.section(data, "model", ModelIdentity),
            drafts=reader.section(data, "drafts", list[Draft], []),
            tasks=reader.section(data, "tasks", dict[str, Task], {}),
            calibration=calibration,
            vocabulary=reader.typed(VocabularyRanking | None, vocabulary, "calibration.vocabulary"),
            artifacts=Artifacts.read(data.get("artifacts"), reader),
            tool=reader.section(data, "tool", dict[str, str], {}),
            schema_version=data["schema_version"],
        )
        reader.unknown += [key for key in data if key not in _TOP_LEVEL_KEYS]
        manifest.unknown_keys = reader.unknown
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Check the invariants a runtime relies on; raise ManifestError naming the first broken one."""
        n = self.model.num_layers
        names = [d.name for d in self.drafts]
        if len(set(names)) != len(names):
            raise ManifestError(f"duplicate draft names in the manifest: {names}")
        for d in self.drafts:
            try:
                check_skip_layers(d.skip_layers, n)
            except SkipSetError as exc:
                raise ManifestError(f"draft {d.name!r}: {exc}") from exc
            if d.weight_precision not in WEIGHT_PRECISIONS:
                raise ManifestError(
                    f"draft {d.name!r}: weight_precision {d.weight_precision!r} is not one of "
                    f"{', '.join(WEIGHT_PRECISIONS)}"
                )
            if d.vocab_size is not None and d.vocab_size < 1:
                raise ManifestError(f"draft {d.name!r}: vocab_size must be >= 1 or null")
            for name in ("max_draft_tokens", "fixed_length_tokens"):
                if getattr(d, name) is not None and getattr(d, name) < 1:
                    raise ManifestError(f"draft {d.name!r}: {name} must be >= 1 or null")
            if d.confidence_threshold is not None and not 0.0 <= d.confidence_threshold <= 1.0:
                raise ManifestError(f"draft {d.name!r}: confidence_threshold must be in [0, 1] or null")
            tree = (d.tree_nodes, d.tree_width)
            if tree != (None, None) and (None in tree or min(tree) < 1):  # type: ignore[type-var]
                raise ManifestError(f"draft {d.name!r}: tree_nodes and tree_width must be >= 1, or both null")
        for task_name, task in self.tasks.items():
            if task.draft is not None and task.draft not in names:
                raise ManifestError(f"task {task_name!r} names an unknown draft {task.draft!r}")
            lookup = task.lookup
            if lookup is not None and not (
                1 <= lookup.min_ngram <= lookup.max_ngram and lookup.max_draft_tokens >= 1
            ):
                raise ManifestError(
                    f"task {task_name!r}: lookup needs 1 <= min_ngram <= max_ngram and "
                    f"max_draft_tokens >= 1, got {lookup}"
                )
        if "vocabulary" in self.calibration:  # to_dict would write two rankings into one key
            raise ManifestError("calibration['vocabulary'] is set: set Manifest.vocabulary instead")
        if self.artifacts is not None:
            self.artifacts.check(names, n)


# A skip set lists whole layers (ints) and single blocks: "<layer>.attention" or "<layer>.mlp"
# (SWIFT-style component skipping, schema 1.3). Readers before 1.3 refuse such a set: they type
# every entry as an integer.
BLOCKS = ("attention", "mlp")


class SkipPlan(NamedTuple):
    """A skip set split by what is skipped: whole layers, and attention or MLP blocks alone."""

    layers: list[int]
    attention: list[int]
    mlp: list[int]

    @classmethod
    def of(cls, skip: list[int | str]) -> SkipPlan:
        """Split a skip set already checked by check_skip_layers."""
        blocks: dict[str, list[int]] = {b: [] for b in BLOCKS}
        for unit in skip:
            if isinstance(unit, str):
                layer, block = unit.split(".")
                blocks[block].append(int(layer))
        layers = [unit for unit in skip if isinstance(unit, int)]
        return cls(sorted(layers), sorted(blocks["attention"]), sorted(blocks["mlp"]))


def skip_unit_layer(unit: object) -> int | None:
    """The layer of a skip-set entry (a layer index, "<layer>.attention" or "<layer>.mlp"); None
    for anything else."""
    if isinstance(unit, int) and not isinstance(unit, bool):
        return unit
    layer, _, block = unit.partition(".") if isinstance(unit, str) else ("", "", "")
    return int(layer) if layer.isdigit() and block in BLOCKS else None


def skip_order(unit: int | str) -> tuple[int, str]:
    """Sort key of skip-set entries: by layer, a whole layer before its blocks."""
    layer = skip_unit_layer(unit)
    return (-1 if layer is None else layer, str(unit).partition(".")[2])


def check_skip_layers(skip_layers: list[int | str], num_layers: int) -> None:
    """Layers 1..L-2 (or one of their blocks) may be skipped; the first and last decoder layers
    never are."""
    layers = [skip_unit_layer(unit) for unit in skip_layers]
    malformed = [unit for unit, layer in zip(skip_layers, layers, strict=True) if layer is None]
    if malformed:
        raise SkipSetError(
            f"skip set entry {malformed[0]!r} is neither a layer index nor '<layer>.attention' "
            "or '<layer>.mlp'"
        )
    bad = [i for i in layers if not 1 <= i <= num_layers - 2]  # type: ignore[operator]
    if bad:
        raise SkipSetError(
            f"skip set {skip_layers} has invalid layers {bad}: only layers 1..{num_layers - 2} "
            f"of a {num_layers}-layer model may be skipped (never the first or the last)"
        )
    if len(set(skip_layers)) != len(skip_layers):
        raise SkipSetError(f"skip set {skip_layers} repeats an entry")
    plan = SkipPlan.of(skip_layers)
    both = sorted(set(plan.attention) & set(plan.mlp))
    if both:
        raise SkipSetError(f"skip set {skip_layers} skips both blocks of layers {both}: list them as layers")
    overlap = sorted(set(plan.layers) & set(plan.attention + plan.mlp))
    if overlap:
        raise SkipSetError(f"skip set {skip_layers} skips layers {overlap} whole and a block of them")


def _refuse(problem: str) -> None:
    raise ManifestError(f"the manifest's {problem}: {_REBUILD}")


_ABSENT = object()  # a top-level section the file leaves out
# The top-level keys of manifest.json (Manifest's fields but the vocabulary, which the JSON keeps
# under calibration, and the reader's own unknown_keys).
_TOP_LEVEL_KEYS = ("schema_version", "model", "drafts", "tasks", "calibration", "artifacts", "tool")


class _Invalid(Exception):
    """A field that does not match its type; _Reader turns it into a ManifestError with the fix."""


def _parse(cls: type[Any], data: object, where: str, fix: str) -> Any:
    """``data`` (parsed JSON) as a ``cls``, checked field by field against the type hints."""
    reader = _Reader()
    reader.fix = fix
    return reader.typed(cls, data, where)


@functools.cache
def _hints(cls: type[Any]) -> dict[str, Any]:
    return get_type_hints(cls)  # resolves the string annotations of `from __future__ import annotations`


class _Reader:
    """The one parser of every manifest section: JSON values checked against the dataclasses' type
    hints (JSON scalars, lists, string-keyed maps, ``X | None``, dataclasses from objects, named
    tuples from lists), with dataclasses and named tuples built. Keys that are no field are skipped
    and recorded in ``unknown`` (a newer minor version's optional fields); a value of the wrong type
    or a missing required field is a ManifestError naming the field and ``fix``."""

    def __init__(self) -> None:
        self.unknown: list[str] = []
        self.fix = _REBUILD

    def section(self, data: dict[str, Any], name: str, hint: Any, default: Any = _ABSENT) -> Any:
        """``data[name]`` as a ``hint`` (a top-level section); ``default`` where the file leaves it
        out (required without one). Calibrate writes every section but ``artifacts`` and ``tool``."""
        self.fix = _RECALIBRATE
        if name not in data:
            if default is _ABSENT:
                raise ManifestError(f"the manifest's {name} section is missing: {self.fix}")
            return default
        return self.typed(hint, data[name], name)

    def typed(self, hint: Any, value: object, where: str) -> Any:
        try:
            return self._typed(hint, value, where)
        except _Invalid as exc:
            raise ManifestError(f"{exc}: {self.fix}") from None

    def _typed(self, hint: Any, value: object, where: str) -> Any:
        origin, args = get_origin(hint), get_args(hint)
        if hint is Any:
            return value
        if origin in (Union, types.UnionType):  # ``X | None``, or alternatives tried in order
            if value is None and type(None) in args:
                return None
            arms = [a for a in args if a is not type(None)]
            for arm in arms[:-1]:
                try:
                    return self._typed(arm, value, where)
                except _Invalid:
                    pass
            return self._typed(arms[-1], value, where)
        if dataclasses.is_dataclass(hint):
            return self._record(hint, value, where)
        if isinstance(hint, type) and issubclass(hint, tuple):  # a NamedTuple, stored as a JSON list
            hints = _hints(hint)
            if not isinstance(value, list) or len(value) != len(hints):
                raise _Invalid(
                    f"the manifest's {where} must be a list [{', '.join(hints)}], got {_show(value)}"
                )
            items = zip(hints.items(), value, strict=True)
            return hint(*(self._typed(h, v, f"{where}.{name}") for (name, h), v in items))
        if origin is list:
            if not isinstance(value, list):
                raise _Invalid(f"the manifest's {where} must be a list, got {_show(value)}")
            return [self._typed(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                raise _Invalid(f"the manifest's {where} must be an object, got {_show(value)}")
            return {k: self._typed(args[1], v, f"{where}.{k}") for k, v in value.items()}
        return _scalar(hint, value, where)

    def _record(self, cls: type[Any], value: object, where: str) -> Any:
        """A dataclass from a JSON object: required fields present, each field of its type; keys that
        are no field are recorded as unknown."""
        if not isinstance(value, dict):
            raise _Invalid(f"the manifest's {where} must be an object, got {_show(value)}")
        fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("derived")]
        for f in fields:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in value:
                raise _Invalid(f"the manifest's {where}.{f.name} is missing")
        names = {f.name for f in fields}
        self.unknown += [f"{where}.{key}" for key in value if key not in names]
        hints = _hints(cls)
        given = [f.name for f in fields if f.name in value]
        return cls(**{name: self._typed(hints[name], value[name], f"{where}.{name}") for name in given})


def _scalar(hint: type, value: object, where: str) -> object:
    """A JSON scalar of type ``hint``. bool is an int in Python, not in JSON; a JSON float may be
    written as 3."""
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    if not ok:
        raise _Invalid(f"the manifest's {where} must be {_JSON_NAMES[hint]}, got {_show(value)}")
    return value


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _show(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _plain(value: Any) -> Any:
    """Dataclasses as JSON objects (fields in order), named tuples and lists as JSON lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.metadata.get("derived")
            and not (f.metadata.get("omit_if_none") and getattr(value, f.name) is None)
        }
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check_version(version: object) -> None:
    if not isinstance(version, str) or "." not in version:
        raise ManifestError(
            f"manifest has no valid schema_version (got {version!r}); was it written by conflayers-export?"
        )
    major, known = version.split(".", 1)[0], SCHEMA_VERSION.split(".", 1)[0]
    if major != known:
        raise ManifestError(
            f"manifest schema {version} is not readable by this runtime (reads {known}.x): install the "
            "conflayers-runtime version that matches the exporter that built it, or rebuild the artifact"
        )


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_NAME} in {folder}: run `conflayers-export calibrate` or `build` first"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); rebuild the artifact") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path} does not hold a JSON object; rebuild the artifact")
    return Manifest.from_dict(data)


def write_manifest(manifest: Manifest, folder: str | os.PathLike[str]) -> Path:
    """Validate, then write atomically (temporary file + rename) so a reader never sees half a file."""
    manifest.validate()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=2, sort_keys=False)
        f.write("\n")
    target = folder / MANIFEST_NAME
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, target)
    return target
