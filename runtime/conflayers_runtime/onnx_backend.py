"""ONNX Runtime backend: the full graph and one draft graph over device-resident KV caches.

Each layer owns one preallocated key and one value buffer [1, kv_heads, max_seq_len, head_dim]
on the execution provider's device, bound through IOBinding as both ``past_key_values.{i}.*``
and ``present.{i}.*``; GroupQueryAttention writes the new positions in place. The draft graph
binds only the layers it keeps (the same buffers). Rolling back a rejected draft is passing a
shorter attention mask next time. What crosses the bus per call: the new token ids (8 bytes
each) on the way in, the logits rows on the way out; the attention mask is a view of a
preallocated device buffer of ones, and the caches never move.

A draft with a pruned vocabulary returns logits over its own columns only; ``draft_token_ids``
maps each column to its token id (the decoding loop applies it).

Row invariance: a kernel may compute a row differently depending on how many rows its pass has,
and greedy speculation is only lossless if a verify pass and a plain step agree bitwise (DESIGN.md).
Every full-graph pass shorter than ``full_pass_rows`` (artifact.row_invariant_rows) is padded
with copies of its last token, whose logits are dropped and whose cache positions lie beyond the
valid length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .errors import GenerationError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int
    dtype: str  # "fp32" or "fp16"
    min_rows: int = 1  # cache positions a pass writes at least (the graph's attention padding)


def device_type(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


class OnnxBackend:
    """Implements :class:`conflayers_runtime.Backend` over a full and an optional draft session."""

    def __init__(
        self,
        full: ort.InferenceSession,
        draft: ort.InferenceSession | None,
        kv: KVSpec,
        device: str = "cpu",
        draft_token_ids: np.ndarray | None = None,
        full_pass_rows: int = 1,
    ):
        self.kv = kv
        self.full_pass_rows = full_pass_rows
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
        self.bindings = {False: self._bind(full), True: self._bind(draft) if draft is not None else None}
        self.sessions = {False: full, True: draft}
        # Logits columns per graph: the vocabulary, or a pruned draft's own width.
        self.widths = {role: int(s.get_outputs()[0].shape[-1]) for role, s in self.sessions.items() if s}
        self._logits: dict[tuple[bool, int], ort.OrtValue] = {}

    def _bind(self, session: ort.InferenceSession) -> ort.IOBinding:
        binding = session.io_binding()
        for node in session.get_inputs():
            if node.name.startswith("past_key_values."):
                _, layer, kind = node.name.split(".")
                cache = self.caches[(int(layer), kind)]
                binding.bind_ortvalue_input(node.name, cache)
                binding.bind_ortvalue_output(f"present.{layer}.{kind}", cache)
        return binding

    def forward(self, token_ids: Sequence[int], start: int, use_draft: bool) -> np.ndarray:
        total = start + max(len(token_ids), self.kv.min_rows)
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
        passed = start + len(token_ids)
        binding.bind_cpu_input("input_ids", np.asarray([token_ids], dtype=np.int64))
        # A [1, passed] view of the preallocated ones: the mask tells the graph the valid length.
        binding.bind_input("attention_mask", self.device, 0, np.int64, [1, passed], self.ones.data_ptr())
        logits = self._logits_buffer(use_draft, len(token_ids))
        binding.bind_ortvalue_output("logits", logits)
        self.sessions[use_draft].run_with_iobinding(binding)
        # [S, V]: a view of the reused host buffer, valid until the next forward of the same length
        # (callers consume it first). Reading it directly avoids wrapping every bound output.
        return logits.numpy()[0, :rows]

    def _logits_buffer(self, draft: bool, rows: int) -> ort.OrtValue:
        """A host buffer [1, rows, width] for the logits; kept for the short steps that repeat."""
        buffer = self._logits.get((draft, rows))
        if buffer is None:
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(
                [1, rows, self.widths[draft]], np.float32, "cpu", 0
            )
            if rows <= 16:  # draft/plain steps and verify passes; prefills vary and are not kept
                self._logits[(draft, rows)] = buffer
        return buffer
