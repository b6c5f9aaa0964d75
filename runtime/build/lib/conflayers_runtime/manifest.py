"""The manifest: the contract between calibrate, build and any runtime (ours or a user's).

``manifest.json`` is plain JSON so that a driver in another language can read it. Its schema is
versioned ``MAJOR.MINOR``: a reader accepts any minor version of the major version it knows
(new optional fields) and refuses another major version with a message naming the fix.

A *draft* is described by what makes it cheaper than the full model: the decoder layers it
skips, and (open for later kinds of drafts) a pruned output vocabulary and the precision of the
weights it reads. Tasks map a name (e.g. ``default``, ``code``) to the draft chosen for it, or
to none when speculation is not recommended for that task.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError, SkipSetError

SCHEMA_VERSION = "1.1"  # 1.1: draft length policy, pruned-vocabulary and quantized drafts built
MANIFEST_NAME = "manifest.json"
WEIGHT_PRECISIONS = ("base", "int8", "int4")  # "base" = the artifact's own precision


@dataclass
class ModelIdentity:
    source: str  # what the user passed to --model (packaged name, file or folder)
    architecture: str  # transformers model_type, e.g. "llama"
    num_layers: int
    fingerprint: str  # "sha256:<hex>" of the source weights


@dataclass
class Draft:
    name: str
    skip_layers: list[int]
    vocab_size: int | None = None  # None: full vocabulary
    weight_precision: str = "base"
    # How long it drafts (the runtime's DraftConfig): calibrate picks these per draft, since an
    # accurate draft pays for longer drafts and a weak one does not. None: the runtime's defaults.
    max_draft_tokens: int | None = None
    confidence_threshold: float | None = None
    # Measured on the calibration set: acceptance_rate, mean_tokens_per_cycle, c_draft,
    # expected_speedup... Free-form so that new metrics need no schema change.
    metrics: dict[str, Any] = field(default_factory=dict)
    recommended: bool = True


@dataclass
class Task:
    draft: str | None  # name of a Draft, or None when speculation is not recommended
    note: str = ""


@dataclass
class Manifest:
    model: ModelIdentity
    drafts: list[Draft] = field(default_factory=list)
    tasks: dict[str, Task] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # settings and seed
    artifacts: dict[str, Any] = field(default_factory=dict)  # files, I/O contract (build)
    tool: dict[str, str] = field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION

    def draft(self, name: str) -> Draft:
        for d in self.drafts:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.drafts) or "none"
        raise ManifestError(f"the manifest has no draft named {name!r} (drafts: {known})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        _check_version(data.get("schema_version"))
        try:
            manifest = cls(
                model=ModelIdentity(**data["model"]),
                drafts=[Draft(**d) for d in data.get("drafts", [])],
                tasks={k: Task(**v) for k, v in data.get("tasks", {}).items()},
                calibration=dict(data.get("calibration", {})),
                artifacts=dict(data.get("artifacts", {})),
                tool=dict(data.get("tool", {})),
                schema_version=data["schema_version"],
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"malformed manifest ({exc}); rebuild it with conflayers-export") from exc
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Check the invariants a runtime relies on; raise ManifestError naming the first broken one."""
        n = self.model.num_layers
        names = [d.name for d in self.drafts]
        if len(set(names)) != len(names):
            raise ManifestError(f"duplicate draft names in the manifest: {names}")
        for d in self.drafts:
            try:
                check_skip_layers(d.skip_layers, n)
            except SkipSetError as exc:
                raise ManifestError(f"draft {d.name!r}: {exc}") from exc
            if d.weight_precision not in WEIGHT_PRECISIONS:
                raise ManifestError(
                    f"draft {d.name!r}: weight_precision {d.weight_precision!r} is not one of "
                    f"{', '.join(WEIGHT_PRECISIONS)}"
                )
            if d.vocab_size is not None and d.vocab_size < 1:
                raise ManifestError(f"draft {d.name!r}: vocab_size must be >= 1 or null")
            if d.max_draft_tokens is not None and d.max_draft_tokens < 1:
                raise ManifestError(f"draft {d.name!r}: max_draft_tokens must be >= 1 or null")
            if d.confidence_threshold is not None and not 0.0 <= d.confidence_threshold <= 1.0:
                raise ManifestError(f"draft {d.name!r}: confidence_threshold must be in [0, 1] or null")
        for task_name, task in self.tasks.items():
            if task.draft is not None and task.draft not in names:
                raise ManifestError(f"task {task_name!r} names an unknown draft {task.draft!r}")


def check_skip_layers(skip_layers: list[int], num_layers: int) -> None:
    """Layers 1..L-2 may be skipped; the first and last decoder layers never are."""
    bad = [i for i in skip_layers if not isinstance(i, int) or not 1 <= i <= num_layers - 2]
    if bad:
        raise SkipSetError(
            f"skip set {sorted(skip_layers)} has invalid layers {bad}: only layers 1..{num_layers - 2} "
            f"of a {num_layers}-layer model may be skipped (never the first or the last)"
        )
    if len(set(skip_layers)) != len(skip_layers):
        raise SkipSetError(f"skip set {skip_layers} repeats a layer")


def _check_version(version: object) -> None:
    if not isinstance(version, str) or "." not in version:
        raise ManifestError(
            f"manifest has no valid schema_version (got {version!r}); was it written by conflayers-export?"
        )
    major, known = version.split(".", 1)[0], SCHEMA_VERSION.split(".", 1)[0]
    if major != known:
        raise ManifestError(
            f"manifest schema {version} is not readable by this runtime (reads {known}.x): install the "
            "conflayers-runtime version that matches the exporter that built it, or rebuild the artifact"
        )


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_NAME} in {folder}: run `conflayers-export calibrate` or `build` first"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); rebuild the artifact") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path} does not hold a JSON object; rebuild the artifact")
    return Manifest.from_dict(data)


def write_manifest(manifest: Manifest, folder: str | os.PathLike[str]) -> Path:
    """Validate, then write atomically (temporary file + rename) so a reader never sees half a file."""
    manifest.validate()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=2, sort_keys=False)
        f.write("\n")
    target = folder / MANIFEST_NAME
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, target)
    return target
