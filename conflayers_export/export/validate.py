"""Parity of the ONNX graphs with PyTorch, step by step over a shared cache.

The same call script runs on the PyTorch reference backend and on the ONNX Runtime backend, for
the full graph and for each draft (against the PyTorch model with the same layers bypassed):
a 16-token prefill, 3 single-token steps, one 5-token verify step over the cache, a rollback of
3 positions and one more step. Every step must give the same argmax at every position and
logits within the tolerance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conflayers_runtime.artifact import open_backend, verify_files
from conflayers_runtime.manifest import read_manifest

from ..errors import ConflayersError
from ..models import LoadedModel
from ..reference import TorchBackend

# fp32: the graphs compute what PyTorch computes, up to summation order.
# fp16 (compared with the fp32 PyTorch model): weights and activations keep 11 significant bits;
# on SmolLM2 the logits (magnitude ~20) then move by up to 0.13 over 30 layers, so 0.25 leaves 2x
# headroom. An argmax may differ only at a near-tie: where the fp32 logit of the fp16 graph's choice
# is within the tolerance of the fp32 maximum.
TOLERANCE = {"fp32": 1e-3, "fp16": 0.25}


class ParityError(ConflayersError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


@dataclass
class StepResult:
    graph: str
    step: str
    max_abs_diff: float
    argmax_equal: bool


def _call_script(vocab_size: int, seed: int = 0) -> list[tuple[str, list[int], int]]:
    rng = np.random.default_rng(seed)
    tokens = [int(t) for t in rng.integers(0, vocab_size, 24)]
    return [
        ("prefill-16", tokens[:16], 0),
        ("step-1", tokens[16:17], 16),
        ("step-2", tokens[17:18], 17),
        ("step-3", tokens[18:19], 18),
        ("verify-5", tokens[19:24], 19),
        ("rollback-3-step", tokens[21:22], 21),  # positions 21..23 are discarded and rewritten
    ]


def _argmax_agrees(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> bool:
    chosen = actual.argmax(-1)
    exact = chosen == expected.argmax(-1)
    near_tie = np.take_along_axis(expected, chosen[:, None], -1)[:, 0] >= expected.max(-1) - tolerance
    return bool((exact | (near_tie if tolerance > TOLERANCE["fp32"] else exact)).all())


def _argmax_agrees(actual: np.ndarray, expected: np.ndarray, dtype: str) -> bool:
    chosen = actual.argmax(-1)
    agrees = chosen == expected.argmax(-1)
    if dtype == "fp16":  # accept a different choice only at a near-tie of the fp32 reference
        chosen_logit = np.take_along_axis(expected, chosen[:, None], -1)[:, 0]
        agrees |= chosen_logit >= expected.max(-1) - TOLERANCE["fp16"]
    return bool(agrees.all())


def check_parity(
    folder: str | os.PathLike[str], loaded: LoadedModel, device: str = "cpu"
) -> list[StepResult]:
    """Run the call script on every graph of the artifact; raise ParityError listing each failure."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    section = manifest.artifacts
    tolerance = TOLERANCE[section["dtype"]]
    results: list[StepResult] = []
    graphs: list[tuple[str, str | None, list[int]]] = [("full", None, [])]
    graphs += [
        (f"draft.{d.name}", d.name, d.skip_layers) for d in manifest.drafts if d.name in section["drafts"]
    ]
    for label, draft_name, skip in graphs:
        onnx_backend = open_backend(folder, manifest, draft_name, device)
        torch_backend = TorchBackend(loaded.model, loaded.architecture, skip)
        use_draft = draft_name is not None
        for step, tokens, start in _call_script(loaded.model.config.vocab_size):
            expected = torch_backend.forward(tokens, start, use_draft)
            actual = onnx_backend.forward(tokens, start, use_draft)
            results.append(
                StepResult(
                    label,
                    step,
                    float(np.abs(actual - expected).max()),
                    _argmax_agrees(actual, expected, section["dtype"]),
                )
            )
    failures = [r for r in results if r.max_abs_diff > tolerance or not r.argmax_equal]
    if failures:
        lines = "; ".join(
            f"{r.graph}/{r.step}: max|diff| {r.max_abs_diff:.2e}, argmax "
            f"{'equal' if r.argmax_equal else 'DIFFERS'}"
            for r in failures
        )
        raise ParityError(f"ONNX graphs disagree with PyTorch (tolerance {tolerance:g}): {lines}")
    return results
