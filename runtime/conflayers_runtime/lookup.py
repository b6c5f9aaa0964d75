"""Lookup drafting: proposals read from the text itself, at no model cost.

Summaries, code explanations, translations, edits and answers that quote their input repeat
spans of the prompt or of what was generated so far. :class:`TextLookup` finds the most recent
earlier occurrence of the text's last n tokens (n from ``max_ngram`` down to ``min_ngram``) and
proposes what followed it, chaining lookups until ``max_draft_tokens`` are proposed or nothing
matches (prompt lookup decoding; onnxruntime-genai's n-gram mode, llama.cpp's lookup and
transformers' ``prompt_lookup_num_tokens`` draft the same way).

A proposal is a deterministic function of the text, so as a draft distribution it is one-hot:
the acceptance rule (sampling.accept_sampled) then accepts a proposed token with the full
model's probability of it and otherwise resamples from the full model's distribution without
it, which keeps sampled output distributed exactly as the full model's; greedy output is plain
decoding's, token for token, like every other draft.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import GenerationError


@dataclass(frozen=True)
class LookupConfig:
    """Which matches propose and how much: longer n-grams match more reliably, shorter ones more
    often; calibrate chooses per task (the manifest's task ``lookup``)."""

    min_ngram: int = 2
    max_ngram: int = 3
    max_draft_tokens: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise GenerationError(f"a lookup needs 1 <= min_ngram <= max_ngram, got {self}")
        if self.max_draft_tokens < 1:
            raise GenerationError(f"a lookup needs max_draft_tokens >= 1, got {self.max_draft_tokens}")


class TextLookup:
    """The text decided so far (prompt + emitted tokens) with, for every n-gram length, where the
    latest occurrence of each n-gram was followed by a token: O(max_ngram) per token added, O(1)
    per lookup."""

    def __init__(self, config: LookupConfig, tokens: Sequence[int] = ()):
        self.config = config
        self.tokens: list[int] = []
        self.ngram_lengths = range(config.max_ngram, config.min_ngram - 1, -1)  # longest first
        # n -> n-gram -> the position of the token that followed its latest occurrence
        self.follows: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.ngram_lengths}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Add decided tokens (never proposals: a rejected proposal must not be matched later)."""
        for token in tokens:
            position = len(self.tokens)
            for n in self.ngram_lengths:
                if position >= n:
                    self.follows[n][tuple(self.tokens[position - n : position])] = position
            self.tokens.append(int(token))

    def propose(self, proposed: Sequence[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens to follow the text plus ``proposed`` (this cycle's proposals so far):
        the continuation of the longest matching n-gram's latest occurrence, chained while it runs
        out before ``limit``."""
        out: list[int] = []
        while len(out) < limit:
            tail = [*proposed, *out]
            continuation = self._continuation(tail, limit - len(out))
            if not continuation:
                break
            out += continuation
        return out

    def _continuation(self, tail: Sequence[int], limit: int) -> list[int]:
        for n in self.ngram_lengths:
            key = (self.tokens[max(0, len(self.tokens) - n + len(tail)) :] + list(tail))[-n:]
            if len(key) < n:
                continue
            start = self.follows[n].get(tuple(key))
            if start is not None:
                return self.tokens[start : start + limit]
        return []
