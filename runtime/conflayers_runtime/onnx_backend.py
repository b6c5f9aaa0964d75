"""ONNX Runtime backend: the full graph and one draft graph over device-resident KV caches.

The two graphs run in two sessions, or in one over the artifact's paired graph (the full model
and the draft as If branches over the same weights, picked by a ``use_draft`` input: the CPU
default, see artifact.open_backend). Each layer owns one preallocated key and one value buffer
[1, kv_heads, max_seq_len, head_dim] on the execution provider's device, bound through IOBinding
as both ``past_key_values.{i}.*`` and ``present.{i}.*``; GroupQueryAttention writes the new
positions in place. The draft binds only the layers it keeps (the same buffers). Rolling back a
rejected draft is passing a shorter attention mask next time. What crosses the bus per call: the
new token ids (8 bytes each) on the way in; on the way out the chosen token ids (and the draft's
top probability) when decoding greedily (:meth:`OnnxBackend.greedy`), else the logits rows. The
attention mask is a view of a preallocated device buffer of ones, and the caches never move.

Capturable graphs (graph.py; on CUDA by default where the artifact has them) take the valid length
as a ``seqlens_k`` input instead of the mask. On CUDA every pass of at most ``CAPTURED_ROWS`` rows
then runs as a CUDA graph (ONNX Runtime's ``enable_cuda_graph``, one ``gpu_graph_id`` per row
count): its input ids and lengths live in fixed device buffers updated in place, and every output
in a fixed device buffer, so that each replay finds the addresses it was captured with. Longer
passes (prompts) run uncaptured.

Tree-form graphs (tree.full.onnx, its paired and capturable forms) also take each row's position
and an attention bias: every pass gets them (a chain's by default), a verify pass over a token
tree its own (``depths``, tree.py); captured passes read them from device buffers per row count.

A draft with a pruned vocabulary returns logits over its own columns only; ``draft_token_ids``
maps each column to its token id (the decoding loop applies it).

Row invariance: a kernel may compute a row differently depending on how many rows its pass has,
and greedy speculation is only lossless if a verify pass and a plain step agree bitwise (DESIGN.md).
Every full-graph pass shorter than ``full_pass_rows`` (artifact.full_pass_rows) is padded
with copies of its last token, whose logits are dropped and whose cache positions lie beyond the
valid length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .errors import GenerationError
from .tree import TREE_INPUTS, tree_inputs

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Passes of at most this many rows keep their buffers (and are captured in CUDA graphs): decode
# steps, draft passes and verify passes; prompts vary in length and do not repeat.
CAPTURED_ROWS = 16
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int
    dtype: str  # "fp32" or "fp16"
    # Cache positions a full-graph pass writes at least: the graph's own attention padding
    # (the manifest's kv.min_attention_rows)
    min_attention_rows: int = 1


def device_type(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


class OnnxBackend:
    """Implements :class:`conflayers_runtime.Backend` over a full and an optional draft session,
    or over one paired session (the same session as both: export/paired.py), whose ``use_draft``
    input each role's binding sets."""

    def __init__(
        self,
        full: ort.InferenceSession,
        draft: ort.InferenceSession | None,
        kv: KVSpec,
        device: str = "cpu",
        draft_token_ids: np.ndarray | None = None,
        full_pass_rows: int = 1,
        cuda_graphs: bool = False,
    ):
        self.kv = kv
        self.cuda_graphs = cuda_graphs
        self.full_pass_rows = full_pass_rows
        # The longest full pass that keeps rows bitwise alike: on CUDA every exact pass has the one
        # row count full_pass_rows (artifact.full_pass_rows); on the CPU any longer pass does (None).
        self.max_full_pass_rows = (
            full_pass_rows if device_type(device) == "cuda" and full_pass_rows > 1 else None
        )
        self.draft_token_ids = draft_token_ids
        self.device = device_type(device)
        shape = [1, kv.num_kv_heads, kv.max_seq_len, kv.head_dim]
        dtype = _NP_DTYPES[kv.dtype]
        # Zero-filled, not merely allocated: attention kernels may read cache positions beyond the
        # valid length and mask them afterwards, and 0 * NaN from stale device memory is NaN
        # (seen on CUDA: garbage logits from the first step). One array per buffer: on CPU the
        # OrtValue wraps the array itself.
        self.caches = {
            (i, kind): ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, 0)
            for i in range(kv.num_layers)
            for kind in ("key", "value")
        }
        self.ones = ort.OrtValue.ortvalue_from_numpy(np.ones((1, kv.max_seq_len), np.int64), self.device, 0)
        self.paired = draft is full
        self._roles = {False: np.array(False), True: np.array(True)}  # use_draft, kept alive while bound
        # A capturable graph's seqlens_k, one fixed buffer per role (updated in place every pass).
        self._seqlens = {
            role: ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int32), self.device, 0)
            for role, session in ((False, full), (True, draft))
            if session is not None and "seqlens_k" in {i.name for i in session.get_inputs()}
        }
        self.bindings = {
            False: self._bind(full, False),
            True: self._bind(draft, True) if draft is not None else None,
        }
        self.sessions = {False: full, True: draft}
        outputs = {role: {o.name for o in s.get_outputs()} for role, s in self.sessions.items() if s}
        self.widths = {role: _logits_width(s, role) for role, s in self.sessions.items() if s}
        # Greedy token choice on the device (graph.py): every graph has next_token_ids and the draft
        # top_probability, in artifacts built since they exist; older ones choose from logits.
        self._choice = {
            role: [n for n in ("next_token_ids", "top_probability") if n in names]
            for role, names in outputs.items()
        }
        self.chooses_on_device = all(self._choice.values()) and (
            draft is None or len(self._choice[True]) == 2
        )
        # Graphs in tree form (tree.full.onnx, or paired with the draft): each pass gets positions
        # and an attention bias, and verify passes may hold a token tree.
        self._tree_form = {
            role: TREE_INPUTS[0] in {i.name for i in s.get_inputs()} for role, s in self.sessions.items() if s
        }
        self.verifies_trees = self._tree_form[False]
        self._buffers: dict[tuple[str, bool, int, str], ort.OrtValue] = {}
        self._graph_options: dict[int, ort.RunOptions] = {}

    def _bind(self, session: ort.InferenceSession, use_draft: bool) -> ort.IOBinding:
        binding = session.io_binding()
        for node in session.get_inputs():
            if node.name == "use_draft":  # a paired graph: this binding runs one branch
                binding.bind_cpu_input("use_draft", self._roles[use_draft])
            if node.name == "seqlens_k":
                binding.bind_ortvalue_input("seqlens_k", self._seqlens[use_draft])
            if node.name.startswith("past_key_values."):
                _, layer, kind = node.name.split(".")
                cache = self.caches[(int(layer), kind)]
                binding.bind_ortvalue_input(node.name, cache)
                binding.bind_ortvalue_output(f"present.{layer}.{kind}", cache)
        return binding

    def forward(
        self, token_ids: Sequence[int], start: int, use_draft: bool, depths: Sequence[int] | None = None
    ) -> np.ndarray:
        """Logits rows [len(token_ids), width]: a view of a reused host buffer, valid until the next
        call with as many rows (callers consume it first). ``depths``: a token tree's row positions
        relative to ``start`` (tree.py; needs ``verifies_trees``), None for a chain."""
        rows = len(token_ids)
        outputs = self._run(token_ids, start, use_draft, logits_on_host=True, depths=depths)
        return outputs["logits"].numpy()[0, :rows]

    def greedy(
        self, token_ids: Sequence[int], start: int, use_draft: bool, depths: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The greedy choice made on the device (needs ``chooses_on_device``): (the argmax token id
        of every row, and for the draft its softmax probability, else None). Only these few bytes
        cross the bus; the logits stay in a device buffer. ``depths`` as for :meth:`forward`."""
        rows = len(token_ids)
        outputs = self._run(token_ids, start, use_draft, logits_on_host=False, depths=depths)
        ids = outputs["next_token_ids"].numpy()[0, :rows]
        return ids, outputs["top_probability"].numpy()[0, :rows] if use_draft else None

    def _run(
        self,
        token_ids: Sequence[int],
        start: int,
        use_draft: bool,
        logits_on_host: bool,
        depths: Sequence[int] | None = None,
    ) -> dict[str, ort.OrtValue]:
        total = start + max(len(token_ids), self.kv.min_attention_rows)
        if total > self.kv.max_seq_len:
            raise GenerationError(
                f"sequence of {total} tokens (with padding rows) exceeds the artifact's max_seq_len "
                f"{self.kv.max_seq_len}: "
                "shorten the prompt or max_new_tokens, or rebuild with a larger --max-seq-len"
            )
        binding = self.bindings[use_draft]
        if binding is None:
            raise GenerationError("this backend was opened without a draft graph")
        rows = len(token_ids)
        if not use_draft and rows < self.full_pass_rows:
            # Padding rows (see the module docstring) as far as the cache has room; the caller's
            # length check leaves room for them (Model.stream).
            padding = min(self.full_pass_rows, self.kv.max_seq_len - start) - rows
            token_ids = [*token_ids, *[token_ids[-1]] * padding]
        rows = len(token_ids)
        ids = np.asarray([token_ids], dtype=np.int64)
        if self._tree_form[use_draft]:  # a chain (and any padding rows) continues in order
            if depths is not None and use_draft:
                raise GenerationError("a draft pass is a chain: token trees are verified by the full graph")
            known = list(range(rows)) if depths is None else list(depths)
            known += range(len(known), rows)
            # A capturable graph's bias spans the whole cache: one shape per row count.
            width = self.kv.max_seq_len if use_draft in self._seqlens else None
            arrays = tree_inputs(known, start, _NP_DTYPES[self.kv.dtype], width)
            for name, values in zip(TREE_INPUTS, arrays, strict=True):
                if self.cuda_graphs:  # a captured pass reads them where they were at capture
                    buffer = self._buffer(name, use_draft, rows, self.device)
                    buffer.update_inplace(values)
                    binding.bind_ortvalue_input(name, buffer)
                else:
                    binding.bind_cpu_input(name, values)
        elif depths is not None:
            raise GenerationError("a token tree needs the artifact's tree graph: open it with tree=True")
        if use_draft in self._seqlens:  # the valid length after the pass, attention padding included
            valid = start + max(rows, self.kv.min_attention_rows)
            self._seqlens[use_draft].update_inplace(np.array([valid - 1], np.int32))
        else:  # a [1, start + rows] view of the preallocated ones: the mask tells the valid length
            mask = self.ones.data_ptr()
            binding.bind_input("attention_mask", self.device, 0, np.int64, [1, start + rows], mask)
        if self.cuda_graphs:  # a captured pass reads its ids where they were at capture
            ids_buffer = self._buffer("input_ids", use_draft, rows, self.device)
            ids_buffer.update_inplace(ids)
            binding.bind_ortvalue_input("input_ids", ids_buffer)
        else:
            binding.bind_cpu_input("input_ids", ids)
        # Outputs on the host are copied there by the run itself; a captured run writes device buffers.
        host = "cpu" if not self.cuda_graphs else self.device
        # Every output is bound each call: a binding keeps earlier buffers, of other row counts.
        logits_device = host if logits_on_host else self.device
        outputs = {"logits": self._buffer("logits", use_draft, rows, logits_device)}
        for name in self._choice[use_draft]:
            outputs[name] = self._buffer(name, use_draft, rows, host)
        for name, buffer in outputs.items():
            binding.bind_ortvalue_output(name, buffer)
        self.sessions[use_draft].run_with_iobinding(binding, self._run_options(rows))
        return outputs

    def _run_options(self, rows: int) -> ort.RunOptions | None:
        """With CUDA graphs, each row count up to CAPTURED_ROWS is its own captured graph; -1 runs
        a pass uncaptured. Every run must name one: ONNX Runtime reads a missing id as graph 0."""
        if not self.cuda_graphs:
            return None
        graph_id = rows if rows <= CAPTURED_ROWS else -1
        options = self._graph_options.get(graph_id)
        if options is None:
            options = self._graph_options[graph_id] = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options

    def _buffer(self, name: str, use_draft: bool, rows: int, device: str) -> ort.OrtValue:
        """An output buffer [1, rows(, width)] on ``device``, kept for the short passes that repeat
        (steps, draft passes, verify passes); prefills vary in length and are not kept."""
        key = (name, use_draft, rows, device)
        buffer = self._buffers.get(key)
        if buffer is None:
            shape = [1, rows]
            dtype = np.int64 if name in ("next_token_ids", "input_ids", "position_ids") else np.float32
            if name == "logits":
                shape.append(self.widths[use_draft])
            if name == "attention_bias":  # a capturable tree graph's: [1, 1, rows, max_seq_len]
                shape, dtype = [1, 1, rows, self.kv.max_seq_len], _NP_DTYPES[self.kv.dtype]
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)
            if rows <= CAPTURED_ROWS:
                self._buffers[key] = buffer
        return buffer


def _logits_width(session: ort.InferenceSession, use_draft: bool) -> int:
    """Logits columns of a graph: the vocabulary, or a pruned draft's own width. A paired graph
    records each branch's in its metadata (its If output cannot declare both)."""
    widths = session.get_modelmeta().custom_metadata_map
    key = "draft_logits_width" if use_draft else "full_logits_width"
    if key in widths:
        return int(widths[key])
    return next(int(o.shape[-1]) for o in session.get_outputs() if o.name == "logits")
