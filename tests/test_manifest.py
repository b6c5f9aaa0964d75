"""The manifest schema: round trip, version policy, invariants, clear errors."""

from __future__ import annotations

import json

import pytest
from conflayers_runtime import (
    SCHEMA_VERSION,
    Draft,
    Manifest,
    ManifestError,
    ModelIdentity,
    Task,
    read_manifest,
    write_manifest,
)


def _manifest() -> Manifest:
    return Manifest(
        model=ModelIdentity("smollm2-135m", "llama", 30, "sha256:abc"),
        drafts=[
            Draft("d1", [14, 15, 16], metrics={"acceptance_rate": 0.7}),
            Draft("small-vocab", [3], 8192, "int8"),
        ],
        tasks={"default": Task("d1"), "code": Task(None, "speculation not recommended")},
        calibration={"seed": 0},
    )


def test_round_trip(tmp_path):
    write_manifest(_manifest(), tmp_path)
    again = read_manifest(tmp_path)
    assert again == _manifest()
    assert again.draft("small-vocab").vocab_size == 8192
    assert not list(tmp_path.glob(".manifest.*")), "temporary file left behind"


def test_newer_minor_version_is_read_and_other_major_refused(tmp_path):
    data = _manifest().to_dict()
    major = int(SCHEMA_VERSION.split(".")[0])
    data["schema_version"] = f"{major}.99"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(tmp_path).schema_version == f"{major}.99"
    data["schema_version"] = f"{major + 1}.0"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=rf"schema {major + 1}\.0 is not readable.*rebuild"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["drafts"][0].update(skip_layers=[0, 5]), r"draft 'd1'.*invalid layers \[0\]"),
        (lambda d: d["drafts"][0].update(skip_layers=[29]), r"invalid layers \[29\].*1\.\.28"),
        (lambda d: d["drafts"][0].update(skip_layers=[3, 3]), "repeats a layer"),
        (lambda d: d["drafts"][1].update(weight_precision="fp8"), "weight_precision 'fp8'"),
        (lambda d: d["tasks"]["default"].update(draft="nope"), "unknown draft 'nope'"),
        (lambda d: d.pop("model"), "malformed manifest"),
        (lambda d: d.pop("schema_version"), "no valid schema_version"),
    ],
)
def test_invalid_manifests_are_refused_with_the_reason(tmp_path, mutate, message):
    data = _manifest().to_dict()
    mutate(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_missing_and_corrupt_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json.*calibrate"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_unknown_draft_lookup_lists_known_ones():
    with pytest.raises(ManifestError, match="drafts: d1, small-vocab"):
        _manifest().draft("x")
