"""``calibrate``: the ConfLayers search on a calibration set, written to a manifest and a report.

Entry points: :func:`calibrate` runs the two stages, which also stand alone: :func:`search_layers`
(the layer search; writes ``calibration/search.json``) and :func:`select_drafts` (the draft that
ships, chosen on built graphs from that search). The folder holds ``manifest.json`` (one draft
per task, with its metrics and a recommendation) and ``calibration/`` (search.json, report.json,
report.md, confidence.png); each stage writes it to a temporary folder and renames it into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conflayers_runtime.artifact import providers_for
from conflayers_runtime.costs import CostTable
from conflayers_runtime.manifest import (
    ARTIFACT_DTYPES,
    MANIFEST_NAME,
    WEIGHT_PRECISIONS,
    Draft,
    Lookup,
    Manifest,
    Task,
    VocabularyRanking,
    read_manifest,
    write_manifest,
)

from .. import __version__
from ..errors import CalibrationError
from ..models import LoadedModel
from ..models.loader import REFERENCE_DTYPES
from ..progress import Progress
from ..staging import replace_folder
from .config import setting_name
from .data import Prompt
from .report import write_reports
from .scoring import EvaluationTexts, generate_texts, score_layer_sets
from .search import Calibrator
from .select import DraftSearch, check_cost_table, rank_vocabulary
from .settings import COST_MODELS, SEARCHES, CalibrationSettings, Candidate, TaskResult

__all__ = ["CalibrationSettings", "TaskResult", "calibrate", "search_layers", "select_drafts"]

SEARCH_RESULTS = "calibration/search.json"  # stage 1's output, stage 2's input


def _one_of(key: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise CalibrationError(f"{setting_name(key)} must be one of {', '.join(allowed)}, got {value!r}")


def check_settings(settings: CalibrationSettings) -> None:
    """Raise CalibrationError naming the first setting out of range (as the user sets it)."""
    if not 0.0 < settings.skip_ratio < 1.0:
        raise CalibrationError(f"{setting_name('skip_ratio')} must be in (0, 1), got {settings.skip_ratio}")
    _one_of("search", settings.search, SEARCHES)
    _one_of("cost", settings.cost, COST_MODELS)
    for name in ("context_window", "search_interval", "max_iter", "max_new_tokens", "eval_prompts"):
        if getattr(settings, name) < 1:
            raise CalibrationError(f"{setting_name(name)} must be >= 1, got {getattr(settings, name)}")
    if settings.confirm_prompts is not None and settings.confirm_prompts < 1:
        name = setting_name("confirm_prompts")
        raise CalibrationError(f"{name} must be >= 1, got {settings.confirm_prompts}")
    for name in ("policy_finalists", "vocab_finalists", "fixed_length_max"):
        if getattr(settings, name) < 0:
            raise CalibrationError(f"{setting_name(name)} must be >= 0, got {getattr(settings, name)}")
    _one_of("dtype", settings.dtype, list(ARTIFACT_DTYPES))
    bad = [lookup for lookup in settings.lookups if not (1 <= lookup[0] <= lookup[1] and lookup[2] >= 1)]
    if bad:
        raise CalibrationError(
            f"{setting_name('lookups')} entries are [min_ngram, max_ngram, tokens] with "
            f"1 <= min_ngram <= max_ngram and tokens >= 1, got {list(bad[0])}"
        )
    unknown = [p for p in settings.precisions if p not in WEIGHT_PRECISIONS]
    if unknown:
        raise CalibrationError(
            f"unknown draft precision(s) {unknown} in {setting_name('precisions')}: "
            f"use {', '.join(WEIGHT_PRECISIONS)}"
        )
    if any(n < 1 for n in settings.vocab_sizes):
        raise CalibrationError(
            f"{setting_name('vocab_sizes')} must be positive, got {list(settings.vocab_sizes)}"
        )
    providers_for(settings.device)  # a device this onnxruntime cannot run fails before the search
    _one_of("reference_device", settings.reference_device, ("cpu", "cuda"))
    if settings.reference_device == "cuda" or settings.device_map not in (None, "cpu"):
        import torch

        if not torch.cuda.is_available():
            raise CalibrationError(
                "the layer search's reference was asked to run on a GPU (--reference-device cuda or "
                "device_map), but this torch sees none: install a CUDA build of torch on a GPU "
                "machine, or pass --reference-device cpu"
            )
    _one_of("reference_dtype", settings.reference_dtype, list(REFERENCE_DTYPES))
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


@dataclass
class CalibrationTexts:
    """The full model's greedy texts a calibration stands on, generated once for both stages: each
    task's evaluation texts, and the generations that rank the vocabulary: those of the prompts
    after every evaluation slice (so the coverage the report shows is measured on held-out text),
    or, with too few prompts to hold any out, the evaluation texts themselves (``ranking`` None)."""

    evaluation: dict[str, EvaluationTexts] = field(default_factory=dict)
    ranking: EvaluationTexts | None = None
    ranking_note: str = ""

    def prepare(self, encoded: dict[str, list[list[int]]], settings: CalibrationSettings) -> None:
        """Texts to generate for ``settings``' slices of the ``encoded`` prompts; those already
        there for the same prompts are kept."""
        for task, prompts in encoded.items():
            wanted = prompts[: settings.eval_prompts]
            if task not in self.evaluation or self.evaluation[task].prompts != wanted:
                self.evaluation[task] = EvaluationTexts(wanted, settings.max_new_tokens)
        held_out = [
            p for task in encoded.values() for p in task[settings.eval_prompts :][: settings.ranking_prompts]
        ]
        if not held_out:
            self.ranking = None
            count = sum(len(e.prompts) for e in self.evaluation.values())
            source = f"the {count} evaluation prompts (too few prompts to hold out)"
        else:
            if self.ranking is None or self.ranking.prompts != held_out:
                # no draft is scored along these: their keys and values are not kept
                self.ranking = EvaluationTexts(held_out, settings.max_new_tokens, keep_caches=False)
            source = f"{len(held_out)} calibration prompts outside the evaluation slices"
        self.ranking_note = f"token counts in greedy generations of {source}"

    @property
    def all(self) -> list[EvaluationTexts]:
        return [*self.evaluation.values(), *([self.ranking] if self.ranking is not None else [])]

    @property
    def ranking_texts(self) -> list[EvaluationTexts]:
        return [self.ranking] if self.ranking is not None else list(self.evaluation.values())


def calibrate(
    out_dir: str | os.PathLike[str],
    loaded: LoadedModel,
    tasks: dict[str, list[Prompt]],
    settings: CalibrationSettings | None = None,
    force: bool = False,
    progress: Progress | None = None,
    costs: CostTable | None = None,
) -> tuple[Manifest, list[TaskResult]]:
    """Both stages: :func:`search_layers`, then :func:`select_drafts` on its results (the
    texts generated once for both, on the first graphs built). ``costs``: see :func:`select_drafts`."""
    settings = settings or CalibrationSettings()
    check_cost_table(costs, loaded, settings)  # before the search: a wrong table fails fast
    texts = CalibrationTexts()
    results = search_layers(out_dir, loaded, tasks, settings, force, progress, texts)
    return select_drafts(out_dir, loaded, settings, progress, results, tasks, texts, costs)


def search_layers(
    out_dir: str | os.PathLike[str],
    loaded: LoadedModel,
    tasks: dict[str, list[Prompt]],
    settings: CalibrationSettings | None = None,
    force: bool = False,
    progress: Progress | None = None,
    texts: CalibrationTexts | None = None,
) -> list[TaskResult]:
    """Stage 1, per task: the ConfLayers layer search (search.py, PyTorch) and its sets and
    baselines scored on built graphs of ``settings.dtype`` (scoring.py). Writes
    ``calibration/search.json`` (the results and the prompts) into ``out_dir``, which
    :func:`select_drafts` reads. ``texts``: filled with the texts, for stage 2."""
    settings = settings or CalibrationSettings()
    progress = progress or Progress()
    check_settings(settings)
    out_dir = Path(out_dir)
    check_output_folder(out_dir, loaded, force)
    encoded = _encode(loaded, tasks)
    texts = texts if texts is not None else CalibrationTexts()
    texts.prepare(encoded, settings)
    calibrator = Calibrator(loaded, settings, progress)
    results = []
    for task, prompts in encoded.items():

        def scorer(sets: list[tuple[str, list[int | str]]], task: str = task) -> list[Candidate]:
            # every text is generated on the first graphs built: a build of the full graph fewer
            evaluation = texts.evaluation[task]
            return score_layer_sets(loaded, settings, sets, evaluation, calibrator.cost, progress, texts.all)

        results.append(calibrator.run(task, prompts, scorer))
    record = {
        "model": loaded.identity.source,
        "fingerprint": loaded.identity.fingerprint,
        "settings": dataclasses.asdict(settings),
        "tasks": tasks,
        "results": [r.as_dict() for r in results],
    }
    # A new search invalidates what a selection or a build made from an older one: start clean.
    with replace_folder(out_dir) as staging:
        (staging / SEARCH_RESULTS).parent.mkdir(parents=True)
        (staging / SEARCH_RESULTS).write_text(json.dumps(record, indent=1) + "\n")
    return results


def select_drafts(
    out_dir: str | os.PathLike[str],
    loaded: LoadedModel,
    settings: CalibrationSettings | None = None,
    progress: Progress | None = None,
    results: list[TaskResult] | None = None,
    tasks: dict[str, list[Prompt]] | None = None,
    texts: CalibrationTexts | None = None,
    costs: CostTable | None = None,
) -> tuple[Manifest, list[TaskResult]]:
    """Stage 2: the vocabulary ranking and, per task, the joint choice of skip set, weight
    precision, vocabulary size and draft length on graphs of ``settings.dtype`` on
    ``settings.device`` (select.py), from the layer search's results (default: ``out_dir``'s
    ``calibration/search.json``, so a selection for another dtype or device reuses a search).
    ``costs`` (with ``settings.cost`` "table"): the pass costs measured on the target device by
    ``conflayers-run profile`` (conflayers_runtime.costs), instead of timings on this machine.
    Writes the manifest and the report into ``out_dir``."""
    settings = settings or CalibrationSettings()
    progress = progress or Progress()
    check_settings(settings)
    search = DraftSearch(loaded, settings, progress, costs)  # checks the cost table
    out_dir = Path(out_dir)
    if results is None or tasks is None:
        results, tasks = read_search(out_dir, loaded)
    encoded = _encode(loaded, tasks)
    texts = texts if texts is not None else CalibrationTexts()
    texts.prepare(encoded, settings)
    generate_texts(loaded, settings, texts.all, progress)

    ranked = rank_vocabulary(_token_counts(loaded, texts.ranking_texts), loaded.stop_token_ids)
    for result in results:
        evaluation = texts.evaluation[result.task]
        result.drafts = search.run(result.task, [[], result.chosen.skip], evaluation, ranked)

    manifest = Manifest(
        model=loaded.identity,
        drafts=[_manifest_draft(r) for r in results],
        tasks={r.task: _manifest_task(r) for r in results},
        calibration={
            "settings": dataclasses.asdict(settings),
            "tasks": {t: len(p) for t, p in tasks.items()},
        },
        # build reads the first vocab_size ids of a pruned draft from here
        vocabulary=VocabularyRanking(ranked[: max(settings.vocab_sizes, default=0)], texts.ranking_note),
        tool={"name": "conflayers-export", "version": __version__},
    )
    header = {
        "model": loaded.identity.source,
        "fingerprint": loaded.identity.fingerprint,
        "settings": dataclasses.asdict(settings),
        "vocabulary_ranking": texts.ranking_note,
    }
    # Graphs built from an older manifest are invalid now: only the search's results carry over.
    search_record = (out_dir / SEARCH_RESULTS).read_bytes() if (out_dir / SEARCH_RESULTS).is_file() else None
    with replace_folder(out_dir) as staging:
        write_reports(staging / "calibration", results, header)
        if search_record is not None:
            (staging / SEARCH_RESULTS).write_bytes(search_record)
        write_manifest(manifest, staging)
    return manifest, results


def read_search(out_dir: Path, loaded: LoadedModel) -> tuple[list[TaskResult], dict[str, list[Prompt]]]:
    """The layer search's results and prompts, as :func:`search_layers` wrote them for ``loaded``."""
    path = out_dir / SEARCH_RESULTS
    if not path.is_file():
        raise CalibrationError(
            f"{path} is missing: run `conflayers-export calibrate --stage search --out {out_dir}` "
            "(or a whole `calibrate`) first"
        )
    try:
        record = json.loads(path.read_text())
        results = [TaskResult.from_dict(r) for r in record["results"]]
        tasks, fingerprint = record["tasks"], record["fingerprint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CalibrationError(f"{path} is corrupt ({exc}): run the search again") from exc
    if fingerprint != loaded.identity.fingerprint:
        raise CalibrationError(
            f"{path} holds a search of another model ({record.get('model')}): pass the same --model, "
            "or search again"
        )
    return results, tasks


def _encode(loaded: LoadedModel, tasks: dict[str, list[Prompt]]) -> dict[str, list[list[int]]]:
    return {task: [loaded.encode(p) for p in prompts] for task, prompts in tasks.items()}


def _token_counts(loaded: LoadedModel, ranking: Sequence[EvaluationTexts]) -> np.ndarray:
    """How often each token was generated, each text cut after its first stop token (what a
    reply emits). Tried and dropped: ranking by expected counts (the full model's probabilities
    summed over the generated positions) cut an int8 draft's acceptance with 8192 tokens on
    SmolLM2 from 0.84 to 0.68: past the few hundred tokens a calibration run emits, the id order
    of a BPE vocabulary (merges numbered by frequency) is a better guess than those small masses."""
    counts = np.zeros(loaded.model.config.vocab_size)
    for texts in ranking:
        for reply in texts.replies(loaded.stop_token_ids):
            np.add.at(counts, reply, 1)
    return counts


def _recommended(result: TaskResult) -> bool:
    return result.drafts is not None and result.drafts.recommended


def _manifest_draft(result: TaskResult) -> Draft:
    assert result.drafts is not None
    c = result.drafts.chosen
    best = result.best_baseline
    metrics = {
        **c.metrics(),
        "bytes_ratio": c.bytes_ratio,
        "cost_source": c.cost_source,
        # the confirming run's, where it ran this draft alone (not a lookup beside it)
        "wall_clock_speedup": result.drafts.wall_clock_speedup if result.drafts.source is None else None,
        "layer_search": {
            "skip_layers": result.chosen.skip,
            "expected_speedup_bytes_model": result.chosen.expected_speedup,
            # None where the baselines were not scored (the baselines setting)
            "best_baseline_speedup": best.expected_speedup if best else None,
            "conflayers_beats_baselines": result.beats_baselines,
        },
        "vocabulary_coverage": result.drafts.coverage.get(c.vocab_size) if c.vocab_size else 1.0,
    }
    fixed = result.drafts.fixed_length
    if fixed is not None:  # by length: what a fixed-length loop is expected to gain
        metrics["fixed_length_expected_speedup"] = {str(k): v for k, v in fixed.speedups.items()}
    return Draft(
        result.task,
        c.skip,
        c.vocab_size,
        c.weight_precision,
        c.max_draft_tokens,
        c.confidence_threshold,
        c.tree_nodes or None,
        c.tree_width or None,
        fixed.max_draft_tokens if fixed is not None else None,
        metrics=metrics,
        recommended=_recommended(result),
    )


def _manifest_task(result: TaskResult) -> Task:
    """The task's sources: its model draft where recommended; a lookup, alone or beside the draft,
    where one was expected faster (select.py, sources.py)."""
    source = result.drafts.source if result.drafts else None
    if source is None:
        return Task(result.task, "" if _recommended(result) else _not_recommended(result))
    assert result.drafts is not None
    metrics = {**source.metrics(), "wall_clock_speedup": result.drafts.wall_clock_speedup}
    lookup = Lookup(source.min_ngram, source.max_ngram, source.max_draft_tokens)
    draft = result.task if source.source == "both" else None  # the draft entry keeps the task's name
    note = f"{source.label}: expected {source.expected_speedup:.2f}x"
    return Task(draft, note, lookup, metrics)


def _not_recommended(result: TaskResult) -> str:
    expected = result.drafts.chosen.expected_speedup if result.drafts else 0.0
    return f"speculation not recommended: the best draft's expected speedup is {expected:.2f}x"
