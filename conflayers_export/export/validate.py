"""Parity of the ONNX graphs with PyTorch, step by step over a shared cache.

The same call script runs on the PyTorch reference backend and on the ONNX Runtime backend, for
the full graph and for each draft (against the PyTorch model with the same layers bypassed):
a 16-token prefill, 3 single-token steps, one 5-token verify step over the cache, a rollback of
3 positions and one more step. Every step must give the same argmax at every position and
logits within the tolerance.

Capturable graphs (CUDA artifacts) run the same script with lengths given as an input.

Row invariance (conflayers_runtime.row_invariance): whether each graph gives a position the same
logits as a step, as any row of a 2-9 token pass and inside a prefill; bitwise for the full graph
is what makes greedy speculation lossless.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from conflayers_runtime.artifact import artifact_section, open_backend, verify_files
from conflayers_runtime.manifest import ARTIFACT_DTYPES, Draft, read_manifest
from conflayers_runtime.row_invariance import RowInvariance, measure

from ..errors import ConflayersError
from ..models import LoadedModel
from ..models.reference import TorchBackend
from .build import draft_bits
from .quantize import quantized_copy

# fp32: the graphs compute what PyTorch computes, up to summation order.
# fp16 (compared with the fp32 PyTorch model): weights and activations keep 11 significant bits;
# on SmolLM2 the logits (magnitude ~20) then move by up to 0.13 over 30 layers, so 0.25 leaves 2x
# headroom. An argmax may differ only at a near-tie: where the fp32 logit of the fp16 graph's choice
# is within the tolerance of the fp32 maximum.
# Quantized graphs (int8/int4 weights) are compared with the PyTorch model holding the very same
# dequantized weights (quantize.quantized_copy), so weight rounding is not part of the error. They
# also round their activations to int8 (quantize.ACCURACY_LEVEL): their logits may move by up to
# QUANTIZED_RELATIVE_TOLERANCE of the largest reference logit (measured: up to 11% on random tiny
# models, 9.9% for SmolLM2's int8 draft), and an argmax may differ only at a near-tie within that.
# For a draft this bounds its quality only; for an int4 full graph it bounds the artifact's
# distance from its float model, and speculation stays exact relative to the graph itself
# (row_invariance below).
TOLERANCE = {"fp32": 1e-3, "fp16": 0.25}
QUANTIZED_RELATIVE_TOLERANCE = 0.25


class ParityError(ConflayersError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


@dataclass
class StepResult:
    graph: str
    step: str
    max_abs_diff: float
    argmax_equal: bool
    tolerance: float = 0.0  # the max|diff| allowed at this step (relative for quantized graphs)


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
    agrees = chosen == expected.argmax(-1)
    if tolerance > TOLERANCE["fp32"]:  # a different choice only at a near-tie of the reference
        chosen_logit = np.take_along_axis(expected, chosen[:, None], -1)[:, 0]
        agrees |= chosen_logit >= expected.max(-1) - tolerance
    return bool(agrees.all())


def check_parity(
    folder: str | os.PathLike[str], loaded: LoadedModel, device: str = "cpu"
) -> list[StepResult]:
    """Run the call script on every graph of the artifact; raise ParityError listing each failure."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    section = artifact_section(manifest)
    dtype = section.dtype
    references: dict[int | None, torch.nn.Module] = {None: loaded.model}

    def reference(bits: int | None) -> torch.nn.Module:
        if bits not in references:
            references[bits] = quantized_copy(loaded.model, bits)
        return references[bits]

    full_bits = ARTIFACT_DTYPES[dtype].weight_bits
    dtype_family = ARTIFACT_DTYPES[dtype].activations
    # (label, draft, weights mode, which role runs, graph form: "mask", "capturable" or "tree"):
    # every graph file, the paired ones in both roles
    graphs: list[tuple[str, Draft | None, str, bool, str]] = [("full", None, "prepacked", False, "mask")]
    for form, forms in (("capturable", section.capturable), ("tree", section.tree)):
        if "full" in forms:
            graphs.append((f"{form}.full", None, "prepacked", False, form))
    for d in manifest.drafts:
        if d.name in section.drafts:
            graphs.append((f"draft.{d.name}", d, "prepacked", True, "mask"))
        if d.name in section.capturable:
            graphs.append((f"capturable.draft.{d.name}", d, "prepacked", True, "capturable"))
        for form, prefix, forms in (("mask", "", section.paired), ("tree", "tree.", section.tree)):
            if d.name in forms:
                graphs += [
                    (f"{prefix}paired.{d.name}/full", d, "paired", False, form),
                    (f"{prefix}paired.{d.name}/draft", d, "paired", True, form),
                ]
    results: list[StepResult] = []
    failures = []
    for label, draft, weights, use_draft, form in graphs:
        name = draft.name if draft else None
        forms = {"capturable": form == "capturable", "tree": form == "tree"}
        onnx_backend = open_backend(folder, manifest, name, device, weights=weights, **forms)
        bits = draft_bits(draft, dtype) if draft and use_draft else full_bits
        approximate = bits is not None  # int8 activations (see above)
        torch_backend = TorchBackend(
            reference(full_bits),
            loaded.architecture,
            draft.skip_layers if draft else (),
            draft_model=reference(bits),
            draft_token_ids=onnx_backend.draft_token_ids,
        )
        for step, tokens, start in _call_script(loaded.model.config.vocab_size):
            expected = torch_backend.forward(tokens, start, use_draft)
            actual = onnx_backend.forward(tokens, start, use_draft)
            scale = float(np.abs(expected).max())
            tolerance = QUANTIZED_RELATIVE_TOLERANCE * scale if approximate else TOLERANCE[dtype_family]
            result = StepResult(
                label,
                step,
                float(np.abs(actual - expected).max()),
                _argmax_agrees(actual, expected, tolerance),
                tolerance,
            )
            results.append(result)
            if result.max_abs_diff > tolerance or not result.argmax_equal:
                failures.append(result)
        # Closed before the next graph opens: two sessions of a large model need not coexist.
        del onnx_backend, torch_backend
    if failures:
        lines = "; ".join(
            f"{r.graph}/{r.step}: max|diff| {r.max_abs_diff:.2e} (tolerance {r.tolerance:g}), argmax "
            f"{'equal' if r.argmax_equal else 'DIFFERS'}"
            for r in failures
        )
        raise ParityError(f"ONNX graphs disagree with PyTorch: {lines}")
    return results


def check_row_invariance(
    folder: str | os.PathLike[str], vocab_size: int, device: str = "cpu", positions: int = 16
) -> list[RowInvariance]:
    """Row invariance of every graph as the runtime opens it, the full graph first (greedy
    speculation is lossless on ``device`` when it is bitwise equal), then, where the runtime pads
    the full graph's passes, the full graph with one-token steps (what the padding removes)."""
    manifest = read_manifest(folder)
    prompt = 16
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, vocab_size, prompt + positions)]
    exact = open_backend(folder, manifest, None, device)
    results = [measure(exact, tokens, prompt)]
    if exact.full_pass_rows > 1:
        results.append(measure(open_backend(folder, manifest, None, device, exact=False), tokens, prompt))
    for name in artifact_section(manifest).drafts:
        backend = open_backend(folder, manifest, name, device)
        results.append(measure(backend, tokens, prompt, use_draft=True, graph=f"draft.{name}"))
    return results
