"""Pass costs measured on the device that will run the drafts, by the runtime alone (no torch).

``conflayers-run profile ARTIFACT --device cuda --out costs.json`` times, on the machine it runs
on, a full decoding step, verify passes of 2..16 rows and every draft graph of the artifact, and
fits a linear cost model per draft weight precision (relative to one full step):

    c_draft = fixed[precision] + kept_layers * per_layer[precision] + columns * per_column[precision]

(``columns``: the draft's vocabulary, its head's width). ``calibrate --costs costs.json`` then
prices every candidate draft from the table instead of timing it on the calibrating machine, so a
GPU artifact or an edge box without torch gets the draft that pays there. The fit needs, per
precision, drafts with at least two kept-layer counts and two vocabulary sizes: the profiling
artifact (``conflayers-export calibrate --stage profile-artifact``) has them. Every timed draft is
listed beside the model's prediction, fitted with and without it (the fit's error, in the table).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .artifact import artifact_section, open_backend
from .errors import CostTableError
from .manifest import read_manifest
from .speculative import fastest_passes

TABLE_FORMAT = "conflayers-cost-table"
TABLE_VERSION = 1
MAX_VERIFY_ROWS = 16  # verify passes timed: 2..16 rows (a cycle of up to 15 drafts)
_PROFILE = "conflayers-run profile ARTIFACT --device DEVICE --out FILE"
_PROFILING_ARTIFACT = "conflayers-export calibrate --stage profile-artifact --dtype DTYPE --out DIR"


@dataclass(frozen=True)
class LinearCost:
    """One precision's draft pass cost, relative to a full step: fixed + per layer + per column."""

    fixed: float
    per_layer: float
    per_column: float

    def __call__(self, kept_layers: int, columns: int) -> float:
        return self.fixed + kept_layers * self.per_layer + columns * self.per_column


@dataclass
class DraftTiming:
    """One timed draft graph, and what the fitted model says it costs."""

    name: str
    precision: str
    kept_layers: int
    columns: int  # logits columns: the vocabulary, or a pruned draft's
    measured: float  # fastest draft pass / fastest full step of the same repeats
    predicted: float = 0.0  # by the fit over every draft of its precision
    held_out: float | None = None  # by the fit without this draft (None: the others cannot determine it)

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1

    @property
    def held_out_error(self) -> float | None:
        return None if self.held_out is None else self.held_out / self.measured - 1


def fit_costs(timings: Sequence[DraftTiming]) -> dict[str, LinearCost]:
    """Least-squares fit of :class:`LinearCost` per precision (:func:`check_design` first); fills
    each timing's ``predicted`` and ``held_out``."""
    check_design(timings)
    coefficients = {}
    for precision in dict.fromkeys(t.precision for t in timings):
        group = [t for t in timings if t.precision == precision]
        coefficients[precision] = cost = _solve(group)
        for t in group:
            t.predicted = cost(t.kept_layers, t.columns)
            others = [o for o in group if o is not t]
            t.held_out = _solve(others)(t.kept_layers, t.columns) if _determined(others) else None
    return coefficients


def check_design(timings: Sequence[DraftTiming]) -> None:
    """Raise CostTableError, naming the fix, when a precision's drafts cannot determine its three
    coefficients (fewer than two kept-layer counts or two vocabulary sizes, varied independently)."""
    for precision in dict.fromkeys(t.precision for t in timings):
        group = [t for t in timings if t.precision == precision]
        if not _determined(group):
            raise CostTableError(
                f"the artifact's {precision} drafts cannot determine the cost model (kept layers "
                f"{[t.kept_layers for t in group]}, vocabulary sizes {[t.columns for t in group]}; it needs "
                "two kept-layer counts and two vocabulary sizes, varied independently): profile an "
                f"artifact built with `{_PROFILING_ARTIFACT}`"
            )


def _design(group: Sequence[DraftTiming]) -> np.ndarray:
    return np.array([[1.0, t.kept_layers, t.columns] for t in group], dtype=np.float64)


def _determined(group: Sequence[DraftTiming]) -> bool:
    return len(group) >= 3 and np.linalg.matrix_rank(_design(group)) == 3


def _solve(group: Sequence[DraftTiming]) -> LinearCost:
    design = _design(group)
    scale = np.abs(design).max(axis=0)  # columns count in thousands, layers in tens
    solution = np.linalg.lstsq(design / scale, [t.measured for t in group], rcond=None)[0] / scale
    return LinearCost(*(float(x) for x in solution))


@dataclass
class CostTable:
    """What ``conflayers-run profile`` measured on one device for one model and artifact dtype.
    Costs are relative to one full decoding step (``step_seconds`` on that device)."""

    device: str
    threads: int | None
    onnxruntime: str
    artifact_dtype: str
    model_source: str
    fingerprint: str
    num_layers: int
    vocab_size: int
    context: int  # tokens in the cache when the passes were timed
    repeats: int
    step_seconds: float
    verify: dict[int, float]  # rows -> one verify pass / one step
    coefficients: dict[str, LinearCost]  # weight precision -> draft pass cost model
    drafts: list[DraftTiming]
    profiled_at: str = ""
    path: str = field(default="", compare=False)  # where it was read from (not written)

    def draft_cost(self, precision: str, kept_layers: int, columns: int) -> float:
        if precision not in self.coefficients:
            raise CostTableError(
                f"the cost table {self.path} has no {precision} drafts (it has "
                f"{', '.join(self.coefficients)}): profile an artifact built with `{_PROFILING_ARTIFACT}`"
            )
        cost = self.coefficients[precision](kept_layers, columns)
        if cost <= 0:  # a fit to noisy timings can cross zero far from its drafts
            raise CostTableError(
                f"the cost table {self.path} prices a {precision} draft of {kept_layers} layers and "
                f"{columns} columns at {cost:.3f} steps (not positive; its fit error is up to "
                f"{self.max_error:.0%}): profile again on a quiet machine with `{_PROFILE}`"
            )
        return cost

    def verify_cost(self, rows: int) -> float:
        if rows not in self.verify:
            raise CostTableError(
                f"the cost table {self.path} times verify passes of {min(self.verify)}..{max(self.verify)} "
                f"rows, not {rows}: profile again with `{_PROFILE}`"
            )
        return self.verify[rows]

    @property
    def max_error(self) -> float:
        """The largest relative error of the fit on the drafts it was fitted to."""
        return max(abs(t.error) for t in self.drafts)

    @property
    def max_held_out_error(self) -> float | None:
        """The largest relative error predicting a draft left out of the fit (None: none could be)."""
        errors = [abs(e) for t in self.drafts if (e := t.held_out_error) is not None]
        return max(errors) if errors else None

    def to_dict(self) -> dict[str, Any]:
        data = {"format": TABLE_FORMAT, "version": TABLE_VERSION}
        data |= {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"}
        data["verify"] = {str(rows): cost for rows, cost in self.verify.items()}
        data["coefficients"] = {p: dataclasses.asdict(c) for p, c in self.coefficients.items()}
        data["drafts"] = [
            dataclasses.asdict(t) | {"error": t.error, "held_out_error": t.held_out_error}
            for t in self.drafts
        ]
        return data | {"max_error": self.max_error, "max_held_out_error": self.max_held_out_error}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "") -> CostTable:
        """The table as read from JSON (KeyError, TypeError or ValueError on a malformed one)."""
        timing_fields = {f.name for f in dataclasses.fields(DraftTiming)}
        given = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        given["verify"] = {int(rows): float(cost) for rows, cost in data["verify"].items()}
        given["coefficients"] = {
            p: LinearCost(**{k: float(v) for k, v in c.items()}) for p, c in data["coefficients"].items()
        }
        given["drafts"] = [
            DraftTiming(**{k: v for k, v in t.items() if k in timing_fields}) for t in data["drafts"]
        ]
        given["path"] = path
        return cls(**given)


def write_cost_table(table: CostTable, path: str | os.PathLike[str]) -> Path:
    """Write atomically (temporary file + rename): a reader never sees half a table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(table.to_dict(), f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_cost_table(path: str | os.PathLike[str]) -> CostTable:
    """A table written by :func:`write_cost_table`; CostTableError names the fix when it is missing,
    not a cost table, of an unknown version or malformed."""
    path = Path(path)
    if not path.is_file():
        raise CostTableError(f"no cost table at {path}: measure one on the target device with `{_PROFILE}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CostTableError(f"{path} is not valid JSON ({exc}): measure it again with `{_PROFILE}`") from exc
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise CostTableError(f"{path} is not a cost table written by `{_PROFILE}`")
    if data.get("version") != TABLE_VERSION:
        raise CostTableError(
            f"{path} is a cost table of version {data.get('version')!r}; this runtime reads version "
            f"{TABLE_VERSION}: measure it again with this runtime's `{_PROFILE}`"
        )
    try:
        return CostTable.from_dict(data, str(path))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CostTableError(
            f"{path} is a malformed cost table ({exc!r}): measure it again with `{_PROFILE}`"
        ) from exc


def profile(
    folder: str | os.PathLike[str],
    device: str = "cpu",
    threads: int | None = None,
    repeats: int = 15,
    context: int = 64,
) -> CostTable:
    """Time the artifact's full step, verify passes of 2..MAX_VERIFY_ROWS rows and every draft on
    ``device``, each as the runtime opens it (artifact.open_backend), and fit the cost model."""
    manifest = read_manifest(folder)
    section = artifact_section(manifest)
    if not section.drafts:
        raise CostTableError(
            f"{folder} has no draft graphs to time: profile an artifact built with `{_PROFILING_ARTIFACT}`"
        )
    if context + MAX_VERIFY_ROWS > section.max_seq_len:
        raise CostTableError(
            f"{folder} holds {section.max_seq_len} positions, fewer than the {context + MAX_VERIFY_ROWS} "
            f"the timing needs: rebuild it with a larger --max-seq-len (or `{_PROFILING_ARTIFACT}`)"
        )
    full = open_backend(folder, manifest, None, device, threads)
    vocab_size = full.widths[False]
    timings = [
        DraftTiming(d.name, d.weight_precision, len(section.layers[d.name]), d.vocab_size or vocab_size, 0.0)
        for d in manifest.drafts
        if d.name in section.drafts
    ]
    check_design(timings)  # before any timing
    rows = range(2, MAX_VERIFY_ROWS + 1)
    verify = {f"verify {n}": (list(range(101, 101 + n)), False) for n in rows}
    seconds = fastest_passes(full, {"step": ([101], False)} | verify, repeats, context)
    del full  # one model in memory at a time
    for t in timings:
        backend = open_backend(folder, manifest, t.name, device, threads)
        timed = fastest_passes(backend, {"step": ([101], False), "draft": ([101], True)}, repeats, context)
        t.measured = timed["draft"] / timed["step"]
        del backend
    return CostTable(
        device=device,
        threads=threads,
        onnxruntime=ort.__version__,
        artifact_dtype=section.dtype,
        model_source=manifest.model.source,
        fingerprint=manifest.model.fingerprint,
        num_layers=manifest.model.num_layers,
        vocab_size=vocab_size,
        context=context,
        repeats=repeats,
        step_seconds=seconds["step"],
        verify={n: seconds[f"verify {n}"] / seconds["step"] for n in rows},
        coefficients=fit_costs(timings),
        drafts=timings,
        profiled_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
