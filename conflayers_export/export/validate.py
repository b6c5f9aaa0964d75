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
from conflayers_runtime.manifest import ARTIFACT_DTYPES, Draft, Manifest, read_manifest
from conflayers_runtime.onnx_backend import OnnxBackend
from conflayers_runtime.row_invariance import RowInvariance, measure

from ..errors import ConflayersError
from ..models import LoadedModel
from ..models.reference import TorchBackend
from .build import draft_bits
from .checker import check_graphs
from .quantize import quantized_copy


@dataclass(frozen=True)
class Tolerance:
    """How far a graph's logits may lie from its PyTorch reference's at one step."""

    absolute: float = 0.0
    relative: float = 0.0  # of the largest |logit| of the reference at that step

    def bound(self, expected: np.ndarray) -> float:
        return self.absolute + self.relative * float(np.abs(expected).max())


# Per (activations, weights): DESIGN.md ("Parity tolerances") gives the measurements behind each.
# Every reference holds the graph's own weights (quantize.quantized_copy: int8/int4 weights
# dequantized), so weight rounding is never part of the error.
# - fp32 activations, float weights: the same math up to summation order.
# - fp16 activations (compared with the fp32 PyTorch model): 11 significant bits; SmolLM2's logits
#   (magnitude ~20) move by up to 0.13 over 30 layers.
# - fp32 activations, int8/int4 weights: on the CPU MatMulNBits rounds its inputs to int8
#   (quantize.ACCURACY_LEVEL), and so does the reference (quantize.round_activations); what is left
#   is where a value near a rounding boundary lands on the other side, amplified over the layers.
#   CUDA ignores the accuracy level: there the graphs are fp16 ones (the row below).
# - fp16 activations, int8/int4 weights: fp16 math over the same weights (no activation rounding
#   to emulate: the CPU's fp16 path does not match it, CUDA has none), fp16's bound plus a share
#   of the logits for the dequantization done in fp16.
TOLERANCES = {
    ("fp32", False): Tolerance(absolute=1e-3),
    ("fp16", False): Tolerance(absolute=0.25),
    ("fp32", True): Tolerance(relative=0.10),
    ("fp16", True): Tolerance(absolute=0.25, relative=0.10),
}
TOLERANCE = {family: TOLERANCES[family, False].absolute for family in ("fp32", "fp16")}


class ParityError(ConflayersError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


@dataclass
class StepResult:
    graph: str
    step: str
    max_abs_diff: float
    argmax_equal: bool
    tolerance: float = 0.0  # the max|diff| allowed at this step (Tolerance.bound)
    scale: float = 0.0  # the largest |logit| of the reference at this step


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


# (label, draft, weights mode, which role runs, graph form: "mask", "capturable" or "tree")
GraphCase = tuple[str, Draft | None, str, bool, str]


def _graph_cases(manifest: Manifest) -> list[GraphCase]:
    """Every graph file of the artifact, the paired ones in both roles."""
    section = artifact_section(manifest)
    cases: list[GraphCase] = [("full", None, "prepacked", False, "mask")]
    for form, forms in (("capturable", section.capturable), ("tree", section.tree)):
        if "full" in forms:
            cases.append((f"{form}.full", None, "prepacked", False, form))
    for d in manifest.drafts:
        if d.name in section.drafts:
            cases.append((f"draft.{d.name}", d, "prepacked", True, "mask"))
        if d.name in section.capturable:
            cases.append((f"capturable.draft.{d.name}", d, "prepacked", True, "capturable"))
        for form, prefix, forms in (("mask", "", section.paired), ("tree", "tree.", section.tree)):
            if d.name in forms:
                cases += [
                    (f"{prefix}paired.{d.name}/full", d, "paired", False, form),
                    (f"{prefix}paired.{d.name}/draft", d, "paired", True, form),
                ]
    return cases


def tolerance_for(dtype: str, bits: int | None) -> Tolerance:
    """The tolerance of a graph of a ``dtype`` artifact whose weights have ``bits`` (None: float)."""
    return TOLERANCES[ARTIFACT_DTYPES[dtype].activations, bits is not None]


def _steps(
    label: str, onnx_backend: OnnxBackend, torch_backend: TorchBackend, use_draft: bool, tolerance: Tolerance
) -> list[StepResult]:
    """The call script on one graph and its reference."""
    results = []
    for step, tokens, start in _call_script(torch_backend.model.config.vocab_size):
        expected = torch_backend.forward(tokens, start, use_draft)
        actual = onnx_backend.forward(tokens, start, use_draft)
        bound = tolerance.bound(expected)
        diff = float(np.abs(actual - expected).max())
        agrees = _argmax_agrees(actual, expected, bound)
        results.append(StepResult(label, step, diff, agrees, bound, float(np.abs(expected).max())))
    return results


def check_parity(
    folder: str | os.PathLike[str], loaded: LoadedModel, device: str = "cpu"
) -> list[StepResult]:
    """Run the call script on every graph of the artifact; raise ParityError listing each failure
    (after ``onnx.checker``, which raises GraphCheckError for a graph that is no valid model)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    check_graphs(folder)
    dtype = artifact_section(manifest).dtype
    # On the CPU, quantized graphs of fp32 activations round them to int8: so does their reference.
    rounds = device == "cpu" and ARTIFACT_DTYPES[dtype].activations == "fp32"
    references: dict[int | None, torch.nn.Module] = {None: loaded.model}

    def reference(bits: int | None) -> torch.nn.Module:
        if bits not in references:
            references[bits] = quantized_copy(loaded.model, bits, int8_activations=rounds)
        return references[bits]

    full_bits = ARTIFACT_DTYPES[dtype].weight_bits
    results: list[StepResult] = []
    for label, draft, weights, use_draft, form in _graph_cases(manifest):
        name = draft.name if draft else None
        forms = {"capturable": form == "capturable", "tree": form == "tree"}
        onnx_backend = open_backend(folder, manifest, name, device, weights=weights, **forms)
        bits = draft_bits(draft, dtype) if draft and use_draft else full_bits
        torch_backend = TorchBackend(
            reference(full_bits),
            loaded.architecture,
            draft.skip_layers if draft else (),
            draft_model=reference(bits),
            draft_token_ids=onnx_backend.draft_token_ids,
        )
        results += _steps(label, onnx_backend, torch_backend, use_draft, tolerance_for(dtype, bits))
        # Closed before the next graph opens: two sessions of a large model need not coexist.
        del onnx_backend, torch_backend
    failures = [r for r in results if r.max_abs_diff > r.tolerance or not r.argmax_equal]
    if failures:
        lines = "; ".join(
            f"{r.graph}/{r.step}: max|diff| {r.max_abs_diff:.2e} (tolerance {r.tolerance:.2e}), argmax "
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
