"""Greedy speculative decoding replayed along the full model's known greedy text.

Greedy speculation emits the full model's greedy text whatever the draft (it is lossless), so
once that text is known, scoring a draft needs no verify pass. A verify pass has two effects:
the full model's next tokens (known: the text) and its keys and values at the verified
positions (known: one pass of the full graph over the whole text). :class:`ReplayBackend` wraps
an :class:`~conflayers_runtime.onnx_backend.OnnxBackend`: its prefill runs the full graph over
prompt + text once and keeps a copy of the caches; each verify pass puts back the positions the
draft overwrote and returns one-hot rows of the text's tokens. The decoding loop
(``speculative.stream``) runs unchanged, so a replay drafts exactly what a real run drafts and
counts the same statistics, as long as a long pass computes every row as the short passes of a
real run do: bitwise on the CPU (row invariance, DESIGN.md), up to the last bits on CUDA.

The full model's keys and values along a text are the same for every draft scored on it, so the
plain decoding that generated the text keeps them (:class:`KnownCaches`, scoring.EvaluationTexts)
and each replay starts from a copy instead of its own prefill: bitwise the same values, since a
pass computes every row as a one-row step does (row invariance) and the full graph inside a
paired graph is the very graph ``full.onnx`` (tests/test_replay.py compares both with real runs).

The text must be generated without stop tokens for ``max_new_tokens`` tokens: a verify pass may
look past a stop token (its accepted count does), and the loop never asks beyond that length.

Token trees replay too: an alternative that equals the text's token at its position predicts the
text's next token (what its row's argmax is but at near-ties, where the real row is not bitwise
a step: tree.py); the loop only reads the rows of such alternatives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from conflayers_runtime import DraftConfig, GenerationStats, LookupConfig, TreeConfig
from conflayers_runtime.onnx_backend import OnnxBackend
from conflayers_runtime.speculative import GREEDY, generate


class ReplayBackend:
    """A Backend whose full-model passes are read from ``text`` (the greedy continuation of one
    prompt); draft passes run on ``backend``."""

    def __init__(
        self,
        backend: OnnxBackend,
        prompt: Sequence[int],
        text: Sequence[int],
        known: KnownCaches | None = None,
    ):
        self.backend = backend
        self.draft_token_ids = backend.draft_token_ids
        self.prompt = list(prompt)
        self.sequence = [*prompt, *text]  # position i holds token i; the model's output at i is i + 1
        self.known = known  # the full model's keys and values along the text (None: a prefill computes them)
        self.saved: dict[tuple[int, str], np.ndarray] = {}

    @property
    def chooses_on_device(self) -> bool:
        return self.backend.chooses_on_device

    @property
    def verifies_trees(self) -> bool:
        return self.backend.verifies_trees

    @property
    def max_full_pass_rows(self) -> int | None:  # the room a token tree may fill where passes are padded
        return self.backend.max_full_pass_rows

    def greedy(
        self, token_ids: Sequence[int], start: int, use_draft: bool, depths: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The decoding loop's greedy path: the draft's choices from its graph, the full model's from
        the text."""
        if use_draft:
            return self.backend.greedy(token_ids, start, use_draft=True)
        if start == 0:
            self._prefill(token_ids)
            return np.asarray(self.sequence[1 : len(self.prompt) + 1]), None
        return np.asarray(self._verify(token_ids, start, depths)), None

    def forward(
        self, token_ids: Sequence[int], start: int, use_draft: bool, depths: Sequence[int] | None = None
    ) -> np.ndarray:
        """The same as logits rows, for backends that choose from logits: one-hot rows of the text."""
        if use_draft:
            return self.backend.forward(token_ids, start, use_draft=True)
        targets, _ = self.greedy(token_ids, start, use_draft=False, depths=depths)
        rows = np.zeros((len(targets), self.backend.widths[False]), np.float32)
        rows[np.arange(len(targets)), targets] = 1.0
        return rows

    def _prefill(self, token_ids: Sequence[int]) -> None:
        """The full model's keys and values everywhere along prompt + text: the known ones, else one
        full-graph pass over them."""
        if list(token_ids) != self.prompt:
            raise ValueError("a replay starts with the prompt its text was generated from")
        if self.known is not None:
            self.saved = self.known.padded(self.backend, len(self.sequence) - 1)
            self._restore(0, len(self.sequence) - 1)
            return
        logits = self.backend.forward(self.sequence[:-1], 0, use_draft=False)
        if int(logits[len(self.prompt) - 1].argmax()) != self.sequence[len(self.prompt)]:
            raise ValueError("the replayed text is not the full model's greedy continuation of its prompt")
        self.saved = {key: cache.numpy().copy() for key, cache in self.backend.caches.items()}

    def _verify(self, token_ids: Sequence[int], start: int, depths: Sequence[int] | None = None) -> list[int]:
        """The full model's tokens after each of ``token_ids`` (read from the text; rows at ``depths``
        of a token tree), and its keys and values put back where the draft wrote its own."""
        depths = list(range(len(token_ids))) if depths is None else list(depths)
        end = start + max(depths) + 1
        if end >= len(self.sequence) or list(token_ids[:1]) != self.sequence[start : start + 1]:
            raise ValueError(f"verify pass at {start} leaves the replayed text (length {len(self.sequence)})")
        self._restore(start, start + len(token_ids) + self.backend.kv.min_attention_rows)
        return [self.sequence[start + depth + 1] for depth in depths]

    def _restore(self, start: int, stop: int) -> None:
        """Put back the full model's keys and values at [start, stop), where drafts wrote theirs."""
        for key, saved in self.saved.items():
            cache = self.backend.caches[key]
            if self.backend.device == "cpu":  # the OrtValue wraps a host array: a view, written in place
                cache.numpy()[:, :, start:stop] = saved[:, :, start:stop]
            else:
                cache.update_inplace(saved)


class KnownCaches:
    """The full model's keys and values at the first ``length`` positions of a sequence, copied
    from a backend that computed them (the plain decoding that generated a replayed text)."""

    def __init__(self, backend: OnnxBackend, length: int):
        self.length = length
        self.values = {key: cache.numpy()[:, :, :length].copy() for key, cache in backend.caches.items()}

    def padded(self, backend: OnnxBackend, length: int) -> dict[tuple[int, str], np.ndarray]:
        """The values as ``backend``'s cache buffers hold them (zeros beyond ``length``, where no
        pass reads before writing)."""
        if length != self.length or self.values.keys() != backend.caches.keys():
            raise ValueError(
                f"known keys and values of {self.length} positions and {len(self.values)} buffers, "
                f"for a replay of {length} positions over {len(backend.caches)}"
            )
        out = {}
        for key, cache in backend.caches.items():
            buffer = np.zeros(cache.shape(), self.values[key].dtype)
            buffer[:, :, :length] = self.values[key]
            out[key] = buffer
        return out


def replay_generation(
    backend: OnnxBackend,
    prompts: Sequence[Sequence[int]],
    texts: Sequence[Sequence[int]],
    max_new_tokens: int,
    draft_config: DraftConfig | None,
    stop_token_ids: Sequence[int],
    tree: TreeConfig | None = None,
    lookup: LookupConfig | None = None,
    known: Sequence[KnownCaches] | None = None,
) -> GenerationStats:
    """Greedy speculative decoding statistics of every prompt, replayed along its text
    (``draft_config`` None: proposals from the ``lookup`` alone). ``known``: each text's full-model
    keys and values, where they were kept (else each replay computes them)."""
    total = GenerationStats()
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        replay = ReplayBackend(backend, prompt, text[:max_new_tokens], known[i] if known else None)
        _, stats = generate(
            replay, prompt, max_new_tokens, GREEDY, draft_config, stop_token_ids, tree, lookup
        )
        total.merge(stats)
    return total
