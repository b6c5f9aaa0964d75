"""``calibrate``: the ConfLayers search on a calibration set, written to a manifest and a report.

Entry point: :func:`calibrate`. The folder it writes holds ``manifest.json`` (one draft per task,
with its metrics and a recommendation) and ``calibration/`` (report.json, report.md,
confidence.png); it is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from conflayers_runtime.artifact import providers_for
from conflayers_runtime.manifest import (
    ARTIFACT_DTYPES,
    MANIFEST_NAME,
    WEIGHT_PRECISIONS,
    Draft,
    Manifest,
    Task,
    VocabularyRanking,
    read_manifest,
    write_manifest,
)

from .. import __version__
from ..errors import CalibrationError
from ..models import LoadedModel
from ..progress import Progress
from ..staging import replace_folder
from .data import Prompt
from .drafts import DraftSearch, rank_vocabulary
from .report import write_reports
from .scoring import EvaluationTexts, generate_texts, score_layer_sets
from .search import COST_MODELS, SEARCHES, CalibrationSettings, Calibrator, Candidate, TaskResult

__all__ = ["CalibrationSettings", "TaskResult", "calibrate"]


def check_settings(settings: CalibrationSettings) -> None:
    if not 0.0 < settings.skip_ratio < 1.0:
        raise CalibrationError(f"--skip-ratio must be in (0, 1), got {settings.skip_ratio}")
    if settings.search not in SEARCHES:
        raise CalibrationError(f"--search must be one of {', '.join(SEARCHES)}, got {settings.search!r}")
    if settings.cost not in COST_MODELS:
        raise CalibrationError(f"--cost must be one of {', '.join(COST_MODELS)}, got {settings.cost!r}")
    for name in ("context_window", "search_interval", "max_iter", "max_new_tokens", "eval_prompts"):
        if getattr(settings, name) < 1:
            raise CalibrationError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")
    if settings.dtype not in ARTIFACT_DTYPES:
        raise CalibrationError(f"--dtype must be one of {', '.join(ARTIFACT_DTYPES)}, got {settings.dtype!r}")
    unknown = [p for p in settings.precisions if p not in WEIGHT_PRECISIONS]
    if unknown:
        raise CalibrationError(f"unknown draft precision(s) {unknown}: use {', '.join(WEIGHT_PRECISIONS)}")
    if any(n < 1 for n in settings.vocab_sizes):
        raise CalibrationError(f"--vocab-sizes must be positive, got {list(settings.vocab_sizes)}")
    providers_for(settings.device)  # a device this onnxruntime cannot run fails before the search
    if settings.device == "cuda" and ARTIFACT_DTYPES[settings.dtype].activations != "fp16":
        raise CalibrationError(f"--dtype {settings.dtype} cannot run on CUDA: use fp16 or int4-fp16")


def check_output_folder(out_dir: Path, loaded: LoadedModel, force: bool) -> None:
    """Refuse to overwrite a folder that belongs to another model (unless forced)."""
    if not (out_dir / MANIFEST_NAME).is_file() or force:
        return
    existing = read_manifest(out_dir)
    if existing.model.fingerprint != loaded.identity.fingerprint:
        raise CalibrationError(
            f"{out_dir} already holds a manifest for another model ({existing.model.source}); "
            "choose another --out folder or pass --force to replace it"
        )


def calibrate(
    out_dir: str | os.PathLike[str],
    loaded: LoadedModel,
    tasks: dict[str, list[Prompt]],
    settings: CalibrationSettings | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> tuple[Manifest, list[TaskResult]]:
    """Search one draft per task and write the manifest and the report into ``out_dir``.

    Stages: the full model's greedy text of the evaluation and ranking prompts (on the target
    graphs, once); per task the ConfLayers layer search (search.py, PyTorch), its sets scored on
    built graphs (scoring.py); the vocabulary ranking; the joint choice of skip set, weight
    precision, vocabulary size and draft length on the target graphs (drafts.py)."""
    settings = settings or CalibrationSettings()
    progress = progress or Progress()
    check_settings(settings)
    out_dir = Path(out_dir)
    check_output_folder(out_dir, loaded, force)
    encoded = {task: [loaded.encode(p) for p in prompts] for task, prompts in tasks.items()}
    evaluations = {
        task: EvaluationTexts(prompts[: settings.eval_prompts], settings.max_new_tokens)
        for task, prompts in encoded.items()
    }
    ranking, ranking_note = _ranking_prompts(encoded, settings)
    generate_texts(loaded, settings, [*evaluations.values(), ranking], progress)

    calibrator = Calibrator(loaded, settings, progress)
    results = []
    for task, prompts in encoded.items():

        def scorer(sets: list[tuple[str, list[int]]], task: str = task) -> list[Candidate]:
            return score_layer_sets(loaded, settings, sets, evaluations[task], calibrator.cost, progress)

        results.append(calibrator.run(task, prompts, scorer))

    ranked = rank_vocabulary(_token_counts(loaded, ranking), loaded.stop_token_ids)
    search = DraftSearch(loaded, settings, progress)
    for result in results:
        result.drafts = search.run(result.task, [[], result.chosen.skip], evaluations[result.task], ranked)

    manifest = Manifest(
        model=loaded.identity,
        drafts=[_draft(r) for r in results],
        tasks={r.task: Task(r.task, "" if _recommended(r) else _not_recommended(r)) for r in results},
        calibration={
            "settings": dataclasses.asdict(settings),
            "tasks": {t: len(p) for t, p in tasks.items()},
        },
        # build reads the first vocab_size ids of a pruned draft from here
        vocabulary=VocabularyRanking(ranked[: max(settings.vocab_sizes, default=0)], ranking_note),
        tool={"name": "conflayers-export", "version": __version__},
    )
    header = {
        "model": loaded.identity.source,
        "fingerprint": loaded.identity.fingerprint,
        "settings": dataclasses.asdict(settings),
        "vocabulary_ranking": ranking_note,
    }
    # A new calibration invalidates graphs built from an older manifest: the folder starts clean.
    with replace_folder(out_dir) as staging:
        write_reports(staging / "calibration", results, header)
        write_manifest(manifest, staging)
    return manifest, results


def _ranking_prompts(
    encoded: dict[str, list[list[int]]], settings: CalibrationSettings
) -> tuple[EvaluationTexts, str]:
    """The prompts whose greedy generations rank the vocabulary: outside every evaluation slice
    (so the coverage the report shows is measured on held-out text)."""
    prompts = [
        p for task in encoded.values() for p in task[settings.eval_prompts :][: settings.ranking_prompts]
    ]
    source = f"{len(prompts)} calibration prompts outside the evaluation slices"
    if not prompts:  # too few prompts to hold any out: rank on the evaluation prompts themselves
        prompts = [p for task in encoded.values() for p in task[: settings.eval_prompts]]
        source = f"the {len(prompts)} evaluation prompts (too few prompts to hold out)"
    return EvaluationTexts(
        prompts, settings.max_new_tokens
    ), f"token counts in greedy generations of {source}"


def _token_counts(loaded: LoadedModel, ranking: EvaluationTexts) -> np.ndarray:
    """How often each token was generated, each text cut after its first stop token (what a
    reply emits). Tried and dropped: ranking by expected counts (the full model's probabilities
    summed over the generated positions) cut an int8 draft's acceptance with 8192 tokens on
    SmolLM2 from 0.84 to 0.68: past the few hundred tokens a calibration run emits, the id order
    of a BPE vocabulary (merges numbered by frequency) is a better guess than those small masses."""
    counts = np.zeros(loaded.model.config.vocab_size)
    stops = set(loaded.stop_token_ids)
    for text in ranking.texts or []:
        end = next((i + 1 for i, t in enumerate(text) if t in stops), len(text))
        np.add.at(counts, text[:end], 1)
    return counts


def _recommended(result: TaskResult) -> bool:
    return result.drafts is not None and result.drafts.recommended


def _draft(result: TaskResult) -> Draft:
    assert result.drafts is not None
    c = result.drafts.chosen
    metrics = {
        "acceptance_rate": c.acceptance_rate,
        "mean_tokens_per_cycle": c.mean_tokens_per_cycle,
        "draft_passes_per_cycle": c.draft_passes_per_cycle,
        "bytes_ratio": c.bytes_ratio,
        "c_draft": c.c_draft,
        "c_verify": c.c_verify,
        "expected_speedup": c.expected_speedup,
        "wall_clock_speedup": result.drafts.confirmation.wall_clock_speedup
        if result.drafts.confirmation
        else None,
        "layer_search": {
            "skip_layers": result.chosen.skip,
            "expected_speedup_bytes_model": result.chosen.expected_speedup,
            "best_baseline_speedup": max(b.expected_speedup for b in result.baselines),
            "conflayers_beats_baselines": result.conflayers_beats_baselines,
        },
        "vocabulary_coverage": result.drafts.coverage.get(c.vocab_size) if c.vocab_size else 1.0,
    }
    return Draft(
        result.task,
        c.skip,
        c.vocab_size,
        c.weight_precision,
        c.max_draft_tokens,
        c.confidence_threshold,
        metrics=metrics,
        recommended=_recommended(result),
    )


def _not_recommended(result: TaskResult) -> str:
    expected = result.drafts.chosen.expected_speedup if result.drafts else 0.0
    return f"speculation not recommended: the best draft's expected speedup is {expected:.2f}x"
