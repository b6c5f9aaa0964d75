"""``build``: write the full graph, one graph per draft, one weights file, the tokenizer and the
updated manifest into a folder, atomically (temporary folder, then rename).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from conflayers_runtime.artifact import file_sha256
from conflayers_runtime.manifest import (
    ARTIFACT_DTYPES,
    CAPTURABLE_TREE,
    MANIFEST_NAME,
    Artifacts,
    CacheLayout,
    Draft,
    FileEntry,
    Manifest,
    Quantization,
    SkipPlan,
    TokenizerFiles,
    WeightEntry,
    check_skip_layers,
    read_manifest,
    skip_order,
    write_manifest,
)
from conflayers_runtime.speculative import DEFAULT_DRAFT_CONFIG

from .. import __version__
from ..errors import BuildError, ManifestError
from ..models import LoadedModel
from ..models.architectures import KVLayout
from ..staging import replace_folder
from .graph import build_graph, draft_vocab_name, min_attention_rows
from .paired import paired_graph
from .quantize import ACCURACY_LEVEL, BITS, BLOCK_SIZE
from .weights import WeightStore, attach_external, weights_file

WEIGHTS_FILE = "weights.bin"
FULL_GRAPH = "full.onnx"
GENAI_CONFIG = "genai_config.json"  # makes the folder loadable by onnxruntime-genai
# An overlay of GENAI_CONFIG (onnxruntime-genai's Config.overlay) that adds the default draft as
# its draft model: its own speculative decoding with our draft graph, over the same weights file.
GENAI_SPECULATIVE = "genai_speculative.json"
GENAI_MAX_DRAFT_TOKENS = 16  # the most onnxruntime-genai 0.18 accepts for speculative.max_draft_tokens
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
_CHAT_SENTINEL = "\x00CONFLAYERS-USER-MESSAGE\x00"


def draft_graph_name(name: str) -> str:
    return f"draft.{name}.onnx"


def paired_graph_name(name: str) -> str:
    return f"paired.{name}.onnx"


def capturable_graph_name(file_name: str) -> str:
    return f"capturable.{file_name}"


def tree_graph_name(file_name: str) -> str:
    return f"tree.{file_name}"


def build_artifact(
    out_dir: str | os.PathLike[str],
    loaded: LoadedModel,
    manifest: Manifest,
    dtype: str = "fp32",
    max_seq_len: int = 2048,
    progress: Callable[[str], None] = lambda step: None,
) -> Manifest:
    """Build every draft listed in ``manifest.drafts`` next to the full graph; returns the new manifest."""
    if dtype not in ARTIFACT_DTYPES:
        raise BuildError(f"unsupported dtype {dtype!r}: use one of {', '.join(ARTIFACT_DTYPES)}")
    num_layers = loaded.identity.num_layers
    for draft in manifest.drafts:
        check_skip_layers(draft.skip_layers, num_layers)
    # Rebuilt below: an earlier build's section may name drafts the manifest no longer lists.
    manifest.artifacts = None
    manifest.validate()
    for draft in manifest.drafts:
        draft_bits(draft, dtype)
        draft_vocabulary(draft, manifest, loaded.model.config.vocab_size)
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit and max_seq_len > limit:
        raise BuildError(f"--max-seq-len {max_seq_len} exceeds the model's {limit} positions")

    with replace_folder(Path(out_dir), carry_subfolders=True) as staging:
        new_manifest = _write(staging, loaded, manifest, dtype, max_seq_len, progress)
    return new_manifest


# The I/O contract as the manifest describes it to drivers (DESIGN.md, "Graph I/O").
GRAPH_INPUTS = {
    "input_ids": "int64 [batch, sequence]",
    "attention_mask": "int64 [batch, total] (ones; total = cached + sequence)",
    "seqlens_k": "int32 [batch], capturable graphs only, instead of attention_mask: the valid cache "
    "length after the pass minus one (a pass counts at least kv.min_attention_rows rows)",
    "position_ids": "int64 [batch, sequence], tree graphs only: each row's position (RoPE)",
    "attention_bias": "activation dtype [batch, 1, sequence, total], tree graphs only: added to every "
    "head's attention scores (0: attend; a large negative value: hide that key from that row)",
}
GRAPH_OUTPUTS = {
    "logits": "float32 [batch, sequence, vocab] (a pruned draft: [.., len(draft_vocab ids)])",
    "present.{layer}.key|value": "the past buffer, updated in place at [total - sequence, total)",
    "next_token_ids": "int64 [batch, sequence]: each row's argmax as a token id (greedy, on the device)",
    "top_probability": "float32 [batch, sequence], drafts only: the argmax's softmax probability",
}


@dataclass
class _Graphs:
    """The graphs of one build, before they are written: ONNX protos with the weights they read."""

    protos: dict[str, tuple[onnx.ModelProto, set[str]]] = field(default_factory=dict)  # by file name
    layers: dict[str, list[int]] = field(default_factory=dict)  # "full" or draft name -> layers run
    drafts: dict[str, str] = field(default_factory=dict)  # draft name -> file name
    draft_vocab: dict[str, str] = field(default_factory=dict)  # draft name -> its token-ids tensor
    capturable: dict[str, str] = field(default_factory=dict)  # "full" or draft name -> file name
    tree: dict[str, str] = field(default_factory=dict)  # "full" or draft name -> file name


def _build_graphs(
    loaded: LoadedModel,
    manifest: Manifest,
    dtype: str,
    max_seq_len: int,
    store: WeightStore,
    progress: Callable[[str], None],
) -> _Graphs:
    model, arch = loaded.model, loaded.architecture
    num_layers = loaded.identity.num_layers
    built = _Graphs()
    # CUDA artifacts (fp16 activations) also get each graph in its capturable form (graph.py).
    forms = (False, True) if ARTIFACT_DTYPES[dtype].activations == "fp16" else (False,)
    progress("full graph")
    # The full graph, and its tree form (position_ids and attention_bias inputs: token-tree verify
    # passes, graph.py), each also capturable for CUDA artifacts.
    for tree, capturable in itertools.product((False, True), forms):
        file_name = tree_graph_name(FULL_GRAPH) if tree else FULL_GRAPH
        if capturable:  # artifacts.capturable names the tree graph's capturable form CAPTURABLE_TREE
            role = CAPTURABLE_TREE if tree else "full"
            file_name = built.capturable[role] = capturable_graph_name(file_name)
        elif tree:
            built.tree["full"] = file_name
        built.protos[file_name] = build_graph(
            model,
            arch,
            range(num_layers),
            dtype,
            max_seq_len,
            store,
            "tree.full" if tree else "full",
            ARTIFACT_DTYPES[dtype].weight_bits,
            capturable=capturable,
            read=loaded.array,
            tree=tree,
        )
    built.layers["full"] = list(range(num_layers))
    for draft in manifest.drafts:
        progress(f"draft {draft.name}")
        plan = SkipPlan.of(draft.skip_layers)
        kept = [i for i in range(num_layers) if i not in plan.layers]
        vocab_ids = draft_vocabulary(draft, manifest, model.config.vocab_size)
        if vocab_ids is not None:  # the id of each logits column, read by runtimes from the weights file
            built.draft_vocab[draft.name] = store.add(draft_vocab_name(len(vocab_ids)), vocab_ids)
        built.drafts[draft.name] = draft_graph_name(draft.name)
        for capturable in forms:
            file_name = draft_graph_name(draft.name)
            if capturable:
                file_name = built.capturable[draft.name] = capturable_graph_name(file_name)
            built.protos[file_name] = build_graph(
                model,
                arch,
                kept,
                dtype,
                max_seq_len,
                store,
                f"draft.{draft.name}",
                draft_bits(draft, dtype),
                vocab_ids,
                confidence=True,
                capturable=capturable,
                read=loaded.array,
                skip_attention=plan.attention,
                skip_mlp=plan.mlp,
            )
        built.layers[draft.name] = kept
    return built


def _write(
    folder: Path,
    loaded: LoadedModel,
    manifest: Manifest,
    dtype: str,
    max_seq_len: int,
    progress: Callable[[str], None],
) -> Manifest:
    # Weights go to the file as the graphs first read them (one tensor in memory at a time).
    with weights_file(folder / WEIGHTS_FILE) as store:
        built = _build_graphs(loaded, manifest, dtype, max_seq_len, store, progress)
    progress("weights")
    for file_name, (graph, used) in built.protos.items():
        attach_external(graph, used, store, WEIGHTS_FILE)
        onnx.save(graph, folder / file_name)
    paired = {}  # the full graph and each draft in one graph, for one session (paired.py)
    tree_full = built.protos[built.tree["full"]][0]
    for name, file_name in built.drafts.items():
        paired[name] = paired_graph_name(name)
        draft = built.protos[file_name][0]
        onnx.save(paired_graph(built.protos[FULL_GRAPH][0], draft, f"paired.{name}"), folder / paired[name])
        # and the tree graph paired with the draft: token trees over one copy of the weights
        built.tree[name] = tree_graph_name(paired[name])
        onnx.save(paired_graph(tree_full, draft, f"tree.paired.{name}"), folder / built.tree[name])

    progress("tokenizer")
    tokenizer_files = _copy_tokenizer(loaded, folder)
    layout = loaded.architecture.kv_layout(loaded.model.config)
    genai_files = _write_genai_config(folder, loaded, layout, max_seq_len, manifest, built)
    files = [
        FULL_GRAPH,
        *genai_files,
        *built.drafts.values(),
        *paired.values(),
        *built.capturable.values(),
        *built.tree.values(),
        WEIGHTS_FILE,
        *tokenizer_files,
    ]
    manifest.artifacts = Artifacts(
        dtype=dtype,
        max_seq_len=max_seq_len,
        weights=WEIGHTS_FILE,
        full=FULL_GRAPH,
        drafts=built.drafts,
        draft_vocab=built.draft_vocab,
        paired=paired,
        capturable=built.capturable,
        tree=built.tree,
        quantization=Quantization(
            operator="com.microsoft.MatMulNBits",
            scheme="asymmetric round-to-nearest per block (scales and zero points)",
            block_size=BLOCK_SIZE,
            accuracy_level={"full": ACCURACY_LEVEL, "drafts": ACCURACY_LEVEL},
        ),
        kv=_cache_layout(layout, dtype),
        layers=built.layers,
        weights_index={
            name: WeightEntry(str(e.dtype), list(e.shape), e.offset, e.length)
            for name, e in store.entries.items()
        },
        graph_weights={
            **{file_name: sorted(used) for file_name, (_, used) in built.protos.items()},
            **{  # a paired graph reads what its two branches read
                file_name: sorted(built.protos[FULL_GRAPH][1] | built.protos[built.drafts[name]][1])
                for name, file_name in paired.items()
            },
        },
        inputs=GRAPH_INPUTS
        | {"past_key_values.{layer}.key|value": f"{dtype} cache, bound to the same buffer as present"},
        outputs=GRAPH_OUTPUTS,
        tokenizer=TokenizerFiles(
            "tokenizer.json",
            *_chat_affixes(loaded),
            loaded.stop_token_ids,
            chat_template=_chat_template(loaded),
        ),
        files={name: FileEntry((folder / name).stat().st_size, file_sha256(folder / name)) for name in files},
    )
    manifest.tool = {"name": "conflayers-export", "version": __version__}
    write_manifest(manifest, folder)
    return manifest


def draft_bits(draft: Draft, dtype: str) -> int | None:
    """Weight bits of a draft's linears (None: float weights, as the artifact's dtype)."""
    artifact_bits = ARTIFACT_DTYPES[dtype].weight_bits
    if draft.weight_precision == "base":
        return artifact_bits
    bits = BITS[draft.weight_precision]
    if artifact_bits is not None and bits > artifact_bits:
        raise BuildError(
            f"draft {draft.name!r}: {draft.weight_precision} weights on a {dtype} artifact would read "
            "more bytes than the full graph itself: use weight_precision 'base' (--draft-precision base)"
        )
    return bits


def draft_vocabulary(draft: Draft, manifest: Manifest, vocab_size: int) -> np.ndarray | None:
    """The sorted token ids a pruned draft scores (None: the whole vocabulary).

    They are the ``vocab_size`` first ids of the ranking calibrate wrote into the manifest (the
    most frequent tokens of its calibration generations, stop tokens first).
    """
    if draft.vocab_size is None or draft.vocab_size == vocab_size:
        return None
    if draft.vocab_size > vocab_size:
        raise BuildError(
            f"draft {draft.name!r}: vocab_size {draft.vocab_size} exceeds the model's vocabulary of "
            f"{vocab_size} tokens: choose a smaller --draft-vocab (or none for the whole vocabulary)"
        )
    ranked = manifest.vocabulary.ranked_token_ids if manifest.vocabulary is not None else []
    if len(ranked) < draft.vocab_size:
        raise BuildError(
            f"draft {draft.name!r} asks for a pruned vocabulary of {draft.vocab_size} tokens, but the "
            f"manifest ranks {len(ranked)}: run `conflayers-export calibrate` (it ranks the vocabulary "
            "on its calibration generations) or choose a smaller --draft-vocab"
        )
    ids = np.asarray(sorted(ranked[: draft.vocab_size]), dtype=np.int64)
    if len(np.unique(ids)) != len(ids) or ids[0] < 0 or ids[-1] >= vocab_size:
        raise ManifestError("the manifest's vocabulary ranking is corrupt (repeated or out-of-range ids)")
    return ids


def _write_genai_config(
    folder: Path, loaded: LoadedModel, layout: KVLayout, max_seq_len: int, manifest: Manifest, built: _Graphs
) -> list[str]:
    """Let onnxruntime-genai run the full graph unmodified (its own decoding loop), and offer the
    default draft to its speculative decoding (GENAI_SPECULATIVE) where it can run it; returns the
    names of the files written."""
    config = loaded.model.config
    # An id past the logits can never be generated, and onnxruntime-genai refuses it as a stop id.
    stops = [i for i in loaded.stop_token_ids if i < config.vocab_size]
    decoder = {
        "filename": FULL_GRAPH,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "head_size": layout.head_dim,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": layout.num_layers,
        "num_key_value_heads": layout.num_kv_heads,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
    }
    genai = {
        "model": {
            "type": config.model_type,
            "vocab_size": config.vocab_size,
            "context_length": max_seq_len,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": stops if len(stops) != 1 else stops[0],
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else (stops or [0])[0],
            "decoder": decoder,
        },
        "search": {
            "do_sample": False,
            "max_length": max_seq_len,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "early_stopping": True,
        },
    }
    (folder / GENAI_CONFIG).write_text(json.dumps(genai, indent=2) + "\n")
    draft = genai_draft(manifest, built.drafts, built.draft_vocab)
    if draft is None:
        return [GENAI_CONFIG]
    # Every draft graph has the full graph's I/O and cache layout (all layers' past inputs), so
    # its block is the decoder's with the draft's file.
    # Its loop drafts the whole length every cycle: the length calibrate picked for such a loop.
    offered = manifest.draft(draft)
    length = offered.fixed_length_tokens or offered.max_draft_tokens or DEFAULT_DRAFT_CONFIG.max_draft_tokens
    # Two sessions take turns: each one's threads stop spinning when its run ends, or the idle
    # pool steals the cores from the working one (onnxruntime-genai passes session_options keys
    # it does not know to ONNX Runtime as session config entries).
    turns = {"session_options": {"session.force_spinning_stop": "1"}}
    draft_session = {"session_options": decoder["session_options"] | turns["session_options"]}
    overlay = {
        "model": {"decoder": turns, "draft": decoder | {"filename": built.drafts[draft]} | draft_session},
        "speculative": {"max_draft_tokens": min(length, GENAI_MAX_DRAFT_TOKENS)},
    }
    (folder / GENAI_SPECULATIVE).write_text(json.dumps(overlay, indent=2) + "\n")
    return [GENAI_CONFIG, GENAI_SPECULATIVE]


def genai_draft(manifest: Manifest, drafts: dict[str, str], draft_vocab: dict[str, str]) -> str | None:
    """The draft GENAI_SPECULATIVE offers: the one ``load(mode="speculative")`` opens (the default
    task's draft if built, else the first built one), unless it scores a pruned vocabulary, which
    onnxruntime-genai cannot verify (it requires draft and target to share the vocabulary); then
    none. ``drafts``: built draft name -> graph file; ``draft_vocab``: the pruned drafts."""
    task = manifest.tasks.get("default")
    built = list(drafts)
    name = task.draft if task is not None and task.draft in built else (built[0] if built else None)
    return name if name is not None and name not in draft_vocab else None


def _copy_tokenizer(loaded: LoadedModel, folder: Path) -> list[str]:
    """Copy the tokenizer files the model folder has; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        source = loaded.folder / name
        if source.is_file():
            shutil.copy2(source, folder / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        raise ManifestError(
            f"{loaded.folder} has no tokenizer.json (a fast tokenizer is required by the runtime)"
        )
    return copied


def _cache_layout(layout: KVLayout, dtype: str) -> CacheLayout:
    return CacheLayout(
        dtype=ARTIFACT_DTYPES[dtype].activations,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        sliding_windows=list(layout.sliding_windows),
        # CPU artifacts' graphs run a one-token pass's attention over its row twice (row
        # invariance, graph.min_attention_rows): every pass writes at least this many positions.
        min_attention_rows=min_attention_rows(dtype),
    )


def _chat_affixes(loaded: LoadedModel) -> tuple[str | None, str | None]:
    """(prefix, suffix): the chat template rendered around one user turn, so the runtime needs no
    Jinja engine; (None, None) without a usable template."""
    try:
        text = loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": _CHAT_SENTINEL}], add_generation_prompt=True, tokenize=False
        )
    except Exception:  # no template, or one that cannot render a lone user turn
        return None, None
    prefix, _, suffix = text.partition(_CHAT_SENTINEL)
    return prefix, suffix


def _chat_template(loaded: LoadedModel) -> str | None:
    """The Jinja chat template the tokenizer applies without arguments (a tokenizer with named
    templates applies "default"); the runtime renders it as transformers does (chat_template.py)."""
    template = getattr(loaded.tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def manifest_for_build(
    out_dir: Path, loaded: LoadedModel, hand_drafts: Iterable[Draft] = (), selected: list[str] | None = None
) -> Manifest:
    """The manifest to build from: the folder's own (checked against the model) or a new one,
    restricted to the ``selected`` drafts, with ``hand_drafts`` added (replacing same-named ones)."""
    if (out_dir / MANIFEST_NAME).is_file():
        manifest = read_manifest(out_dir)
        if manifest.model.fingerprint != loaded.identity.fingerprint:
            raise ManifestError(
                f"{out_dir / MANIFEST_NAME} was made for another model ({manifest.model.source}, "
                f"{manifest.model.fingerprint[:19]}...) than {loaded.identity.source}: pass the matching "
                "--model, or build into a new folder"
            )
    else:
        manifest = Manifest(model=loaded.identity)
    if selected:
        manifest.drafts = [manifest.draft(name) for name in selected]
        manifest.tasks = {k: t for k, t in manifest.tasks.items() if t.draft is None or t.draft in selected}
    for draft in hand_drafts:
        manifest.drafts = [d for d in manifest.drafts if d.name != draft.name]
        manifest.drafts.append(draft)
    return manifest


def hand_draft(
    name: str, skip: list[int | str], weight_precision: str = "base", vocab_size: int | None = None
) -> Draft:
    units = sorted(skip, key=skip_order)
    return Draft(name, units, vocab_size, weight_precision, metrics={"source": "given by hand"})
