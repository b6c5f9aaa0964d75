"""The profiling artifact: the drafts whose timings on a target device determine the cost model.

``conflayers-run profile`` (conflayers_runtime.costs) fits, per draft weight precision, a pass
cost ``fixed + kept_layers * per_layer + columns * per_column``. Three unknowns per precision need
drafts that vary the kept layers and the vocabulary independently, and a spare draft or two to
show the fit's error. Per precision a draft can use on this dtype (select.draft_precisions):

    kept layers:  all, ~3/4, ~1/2  (skipping from layer 1: which layers go does not change the cost)
    vocabulary:   full at each; a pruned one (1/8) at all and at ~1/2 kept

Five drafts per precision (15 for float artifacts, 5 for int4 ones, whose drafts are "base"
only): two spare per precision, so every draft can be predicted from the others (held out). The
~1/2 to all range covers the skip sets calibration scores (up to ~40% of the layers), and 1/8 to
all of the vocabulary covers its pruned sizes (8192 and 32768 of SmolLM2's 49152).

It is built by ``conflayers-export calibrate --stage profile-artifact --dtype D --out DIR`` from
the same building blocks as any artifact (export.build.build_artifact): calibrate is where the
cost table is used, and the folder then travels to the device, which needs only the runtime.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from conflayers_runtime.manifest import MANIFEST_NAME, Draft, Manifest, VocabularyRanking, read_manifest

from ..errors import CalibrationError
from ..export.build import build_artifact
from ..models import LoadedModel
from .select import draft_precisions

PURPOSE = "profiling: drafts that determine the pass cost model (conflayers-run profile)"
MAX_SEQ_LEN = 256  # the timing runs at a 64-token context and verify passes of up to 16 rows


def profiling_skips(num_layers: int) -> list[list[int]]:
    """Skip sets keeping all, ~3/4 and ~1/2 of the layers (distinct; layers 1..L-2 only)."""
    skippable = num_layers - 2
    counts = dict.fromkeys(min(n, skippable) for n in (0, max(1, skippable // 4), max(2, skippable // 2)))
    return [list(range(1, 1 + n)) for n in counts]


def profiling_drafts(num_layers: int, vocab_size: int, dtype: str) -> list[Draft]:
    """The drafts of a profiling artifact (module docstring), named precision-k<kept>-v<columns>."""
    skips = profiling_skips(num_layers)
    pruned = max(1, vocab_size // 8)
    shapes = [(skip, None) for skip in skips] + [(skip, pruned) for skip in (skips[0], skips[-1])]
    return [
        Draft(
            f"{precision}-k{num_layers - len(skip)}-v{vocab or vocab_size}",
            skip,
            vocab,
            precision,
            metrics={"source": PURPOSE},
        )
        for precision in draft_precisions(dtype)
        for skip, vocab in shapes
    ]


def build_profiling_artifact(
    out_dir: str | os.PathLike[str],
    loaded: LoadedModel,
    dtype: str,
    force: bool = False,
    progress: Callable[[str], None] = lambda step: None,
) -> Manifest:
    """Build the profiling artifact of ``loaded`` for ``dtype`` into ``out_dir`` (atomically). A
    folder holding another manifest (a calibration, a real artifact) is only replaced when forced."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).is_file() and not force:
        existing = read_manifest(out_dir)
        if existing.calibration.get("purpose") != PURPOSE:
            raise CalibrationError(
                f"{out_dir} holds a manifest that is no profiling artifact ({existing.model.source}): "
                "choose another --out folder or pass --force to replace it"
            )
    drafts = profiling_drafts(loaded.identity.num_layers, loaded.model.config.vocab_size, dtype)
    pruned = max(d.vocab_size or 0 for d in drafts)
    manifest = Manifest(
        model=loaded.identity,
        drafts=drafts,
        calibration={"purpose": PURPOSE},
        # pruned drafts score the first ids of this ranking: any ids time alike
        vocabulary=VocabularyRanking(list(range(pruned)), "token ids in order (timing only)"),
    )
    return build_artifact(out_dir, loaded, manifest, dtype, MAX_SEQ_LEN, progress)
