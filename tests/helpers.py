"""Building artifacts in tests: drafts given as {name: skip layers} or as Draft objects."""

from __future__ import annotations

from conflayers_runtime.manifest import Draft

from conflayers_export.export.build import build_artifact, hand_draft, manifest_for_build


def build(folder, loaded, drafts, max_seq_len=64, calibration=None, **kwargs):
    hand = [d if isinstance(d, Draft) else hand_draft(name, d) for name, d in drafts.items()]
    manifest = manifest_for_build(folder, loaded, hand)
    if calibration:
        manifest.calibration.update(calibration)
    return build_artifact(folder, loaded, manifest, max_seq_len=max_seq_len, **kwargs)
