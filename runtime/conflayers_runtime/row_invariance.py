"""Row invariance: does a graph give a position the same logits whatever pass computes it?

Greedy speculation decides a token from a row of a (k+1)-token verify pass where plain decoding
decides it from a one-token step. Both are "the full model", but a kernel may choose its algorithm
by the number of rows (see onnx_backend.py), and at a near-tie a last-bit difference flips the
argmax. So speculation is lossless only if every row equals the same position's step bitwise.

:func:`measure` computes the logits of the same positions three ways on one backend (which pads
full-graph passes or not, as it was opened): as steps (the reference), as every row of passes of
2..``max_rows`` tokens at every row offset, and inside one prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .speculative import Backend


@dataclass(frozen=True)
class RowInvariance:
    graph: str
    pass_rows: int  # the fewest rows of a pass of this graph (1: one-token steps, unpadded)
    positions: int  # positions compared, each at every row of every pass length
    max_abs_diff: float  # largest |step logit - pass-row logit| over every position and pass
    bitwise: bool
    argmax_flips: int  # comparisons whose top-1 token differs from the step's
    min_margin: float  # smallest top-1 minus top-2 logit of the steps: the gap a difference must cross

    def describe(self) -> str:
        rows = "one-token steps" if self.pass_rows == 1 else f"passes of >= {self.pass_rows} rows"
        verdict = "bitwise equal" if self.bitwise else f"max|diff| {self.max_abs_diff:.2e}"
        return (
            f"{self.graph} ({rows}): {verdict} over {self.positions} positions x every row of 2-9 token "
            f"passes and the prefill; {self.argmax_flips} argmax flips; smallest top-2 margin "
            f"{self.min_margin:.2e}"
        )


def measure(
    backend: Backend,
    token_ids: Sequence[int],
    prompt_len: int,
    use_draft: bool = False,
    max_rows: int = 9,
    graph: str = "full",
) -> RowInvariance:
    """Compare positions [prompt_len, len(token_ids)) computed as steps, as rows of every pass
    length 2..max_rows at every offset, and inside a prefill of the whole sequence."""
    tokens = list(token_ids)
    end = len(tokens)
    if not 0 < prompt_len < end:
        raise ValueError(f"prompt_len must leave positions to compare: 0 < {prompt_len} < {end}")
    backend.forward(tokens[:prompt_len], 0, use_draft)
    steps = np.stack([backend.forward([tokens[i]], i, use_draft)[0].copy() for i in range(prompt_len, end)])
    worst, flips = 0.0, 0

    def compare(rows: np.ndarray, first: int) -> None:
        nonlocal worst, flips
        expected = steps[first - prompt_len : first - prompt_len + len(rows)]
        worst = max(worst, float(np.abs(rows - expected).max()))
        flips += int((rows.argmax(-1) != expected.argmax(-1)).sum())

    for rows in range(2, max_rows + 1):
        for offset in range(rows):  # each position lands on every row index of some pass
            start = prompt_len + offset
            if start >= end:
                break
            backend.forward(tokens[:start], 0, use_draft)
            for first in range(start, end, rows):
                compare(backend.forward(tokens[first : first + rows], first, use_draft), first)
    compare(backend.forward(tokens, 0, use_draft)[prompt_len:], prompt_len)
    top2 = np.sort(steps, axis=-1)[:, -2:]
    pass_rows = getattr(backend, "full_pass_rows", 1) if not use_draft else 1
    return RowInvariance(
        graph, pass_rows, end - prompt_len, worst, worst == 0.0, flips, float((top2[:, 1] - top2[:, 0]).min())
    )
