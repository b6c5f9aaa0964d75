"""``calibrate``: the ConfLayers search on a calibration set, written to a manifest and a report.

Entry point: :func:`calibrate`. The folder it writes holds ``manifest.json`` (one draft per task,
with its metrics and a recommendation) and ``calibration/`` (report.json, report.md,
confidence.png); it is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from conflayers_runtime.manifest import MANIFEST_NAME, Draft, Manifest, Task, read_manifest, write_manifest

from .. import __version__
from ..errors import CalibrationError
from ..models import LoadedModel
from ..staging import replace_folder
from .data import Prompt
from .report import write_reports
from .search import COST_MODELS, CalibrationSettings, Calibrator, TaskResult

__all__ = ["CalibrationSettings", "TaskResult", "calibrate"]


def check_settings(settings: CalibrationSettings) -> None:
    if not 0.0 < settings.skip_ratio < 1.0:
        raise CalibrationError(f"--skip-ratio must be in (0, 1), got {settings.skip_ratio}")
    if settings.cost not in COST_MODELS:
        raise CalibrationError(f"--cost must be one of {', '.join(COST_MODELS)}, got {settings.cost!r}")
    for name in ("context_window", "search_interval", "max_iter", "max_new_tokens", "eval_prompts"):
        if getattr(settings, name) < 1:
            raise CalibrationError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")


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
    progress: Callable[[str], None] = lambda line: None,
) -> tuple[Manifest, list[TaskResult]]:
    """Search one skip set per task and write the manifest and the report into ``out_dir``."""
    settings = settings or CalibrationSettings()
    check_settings(settings)
    out_dir = Path(out_dir)
    check_output_folder(out_dir, loaded, force)
    calibrator = Calibrator(loaded, settings, progress)
    results = []
    for task, prompts in tasks.items():
        encoded = [loaded.encode(p) for p in prompts]
        results.append(calibrator.run(task, encoded))

    manifest = Manifest(
        model=loaded.identity,
        drafts=[_draft(r) for r in results],
        tasks={r.task: Task(r.task, "" if r.recommended else _not_recommended(r)) for r in results},
        calibration={
            "settings": dataclasses.asdict(settings),
            "tasks": {t: len(p) for t, p in tasks.items()},
        },
        tool={"name": "conflayers-export", "version": __version__},
    )
    header = {
        "model": loaded.identity.source,
        "fingerprint": loaded.identity.fingerprint,
        "settings": dataclasses.asdict(settings),
    }
    # A new calibration invalidates graphs built from an older manifest: the folder starts clean.
    with replace_folder(out_dir) as staging:
        write_reports(staging / "calibration", results, header)
        write_manifest(manifest, staging)
    return manifest, results


def _draft(result: TaskResult) -> Draft:
    c = result.chosen
    metrics = {
        "acceptance_rate": c.acceptance_rate,
        "mean_tokens_per_cycle": c.mean_tokens_per_cycle,
        "draft_passes_per_cycle": c.draft_passes_per_cycle,
        "c_draft": c.c_draft,
        "c_verify": c.c_verify,
        "expected_speedup": c.expected_speedup,
        "evaluated_cycles": c.cycles,
        "best_baseline_speedup": max(b.expected_speedup for b in result.baselines),
        "conflayers_beats_baselines": result.conflayers_beats_baselines,
    }
    return Draft(result.task, c.skip, metrics=metrics, recommended=result.recommended)


def _not_recommended(result: TaskResult) -> str:
    return (
        f"speculation not recommended: the best skip set's expected speedup is "
        f"{result.chosen.expected_speedup:.2f}x"
    )
