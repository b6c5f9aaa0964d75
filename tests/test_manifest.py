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
        (lambda d: d["drafts"][0].update(skip_layers=[3, 3]), "repeats an entry"),
        (lambda d: d["drafts"][1].update(weight_precision="fp8"), "weight_precision 'fp8'"),
        (lambda d: d["tasks"]["default"].update(draft="nope"), "unknown draft 'nope'"),
        (lambda d: d.pop("model"), "model section is missing.*calibrate"),
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


# --- the artifacts section and the vocabulary ranking ------------------------------------------


def _built() -> dict:
    """_manifest() as JSON once built: every artifacts field of the current layout."""
    data = _manifest().to_dict()
    data["calibration"]["vocabulary"] = {"ranked_token_ids": [5, 3, 9], "source": "greedy generations"}
    graphs = {"d1": "draft.d1.onnx", "small-vocab": "draft.small-vocab.onnx"}
    data["artifacts"] = {
        "dtype": "fp32",
        "max_seq_len": 64,
        "weights": "weights.bin",
        "full": "full.onnx",
        "drafts": graphs,
        "draft_vocab": {"small-vocab": "draft_vocab.8192.token_ids"},
        "paired": {"d1": "paired.d1.onnx"},
        "capturable": {},
        "tree": {"full": "tree.full.onnx"},
        "quantization": {
            "operator": "com.microsoft.MatMulNBits",
            "scheme": "asymmetric round-to-nearest per block (scales and zero points)",
            "block_size": 32,
            "accuracy_level": {"full": 4, "drafts": 4},
        },
        "kv": {
            "dtype": "fp32",
            "num_layers": 30,
            "num_kv_heads": 3,
            "head_dim": 64,
            "sliding_windows": [None] * 30,
            "shape": ["batch", "num_kv_heads", "max_seq_len", "head_dim"],
            "past_is_present": True,
            "min_attention_rows": 2,
        },
        "layers": {
            "full": list(range(30)),
            "d1": [i for i in range(30) if i not in (14, 15, 16)],
            "small-vocab": [i for i in range(30) if i != 3],
        },
        "weights_index": {
            "model.norm.weight": ["float32", [576], 0, 2304],
            "draft_vocab.8192.token_ids": ["int64", [8192], 2304, 65536],
        },
        "graph_weights": {
            "full.onnx": ["model.norm.weight"],
            "draft.d1.onnx": ["model.norm.weight"],
            "draft.small-vocab.onnx": ["draft_vocab.8192.token_ids", "model.norm.weight"],
        },
        "inputs": {"input_ids": "int64 [batch, sequence]"},
        "outputs": {"logits": "float32 [batch, sequence, vocab]"},
        "tokenizer": {
            "file": "tokenizer.json",
            "chat_prefix": "<|user|>",
            "chat_suffix": None,
            "stop_token_ids": [2],
        },
        "files": {
            name: {"size": 1, "sha256": "0" * 64}
            for name in (
                *("full.onnx", *graphs.values(), "paired.d1.onnx", "tree.full.onnx"),
                *("weights.bin", "tokenizer.json"),
            )
        },
    }
    return data


def _read(tmp_path, data: dict) -> Manifest:
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return read_manifest(tmp_path)


def test_a_built_manifest_reads_back_to_the_same_json(tmp_path):
    data = _built()
    manifest = _read(tmp_path, data)
    section = manifest.artifacts
    assert section.kv.min_attention_rows == 2 and section.tokenizer.chat_prefix == "<|user|>"
    assert section.weights_index["draft_vocab.8192.token_ids"].offset == 2304
    assert section.files["weights.bin"].sha256 == "0" * 64
    assert manifest.vocabulary.source == "greedy generations"
    assert manifest.to_dict() == data
    write_manifest(manifest, tmp_path)  # and what a rewrite puts on disk
    assert json.loads((tmp_path / "manifest.json").read_text()) == data


def test_a_schema_1_0_artifacts_section_still_loads(tmp_path):
    from conflayers_runtime.artifact import full_pass_rows, kv_spec

    data = _built()
    data["schema_version"] = "1.0"
    del data["calibration"]["vocabulary"]
    section = data["artifacts"]
    section["dtype"] = "fp16"
    del (
        section["draft_vocab"],
        section["paired"],
        section["quantization"],
        section["kv"]["min_attention_rows"],
    )
    del section["kv"]["dtype"]
    manifest = _read(tmp_path, data)
    assert manifest.artifacts.kv.dtype == "fp16"  # 1.0 had float artifacts only: the artifact's
    assert kv_spec(manifest).min_attention_rows == 1  # graphs from before the attention padding...
    assert full_pass_rows(manifest.artifacts, "cpu") == 2  # ...get two-row passes
    assert manifest.artifacts.draft_vocab == {} and manifest.artifacts.quantization is None
    assert manifest.artifacts.paired == {}  # 1.2: two sessions then
    assert manifest.vocabulary is None


def _set(path: str, value: object):
    """A mutation of _built(): set the value at a /-separated path (None: delete the key)."""

    def mutate(data: dict) -> None:
        *parents, key = path.split("/")
        for parent in parents:
            data = data[int(parent)] if isinstance(data, list) else data[parent]
        if value is None:
            del data[key]
        else:
            data[key] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set("artifacts/kv/head_dim", None), r"artifacts\.kv\.head_dim is missing"),
        (_set("artifacts/tokenizer", None), r"artifacts\.tokenizer is missing"),
        (_set("artifacts/files/full.onnx/sha256", None), r"artifacts\.files\.full\.onnx\.sha256 is missing"),
        (_set("artifacts/max_seq_len", "64"), r'artifacts\.max_seq_len must be an integer, got "64"'),
        (_set("artifacts/kv/num_kv_heads", True), r"kv\.num_kv_heads must be an integer, got true"),
        (_set("artifacts/kv/past_is_present", 1), r"past_is_present must be true or false, got 1"),
        (_set("artifacts/drafts", ["draft.d1.onnx"]), r"artifacts\.drafts must be an object"),
        (
            _set("artifacts/weights_index/model.norm.weight", ["float32", [576], 0]),
            r"weights_index\.model\.norm\.weight must be a list \[dtype, shape, offset, length\]",
        ),
        (_set("artifacts/dtype", "bf16"), r"dtype 'bf16' is not one of fp32, fp16, int4, int4-fp16"),
        (_set("artifacts/kv/dtype", "fp16"), r"artifacts\.kv\.dtype 'fp16' does not match a fp32 artifact"),
        (_set("artifacts/drafts/ghost", "draft.ghost.onnx"), r"drafts names draft 'ghost'.*list lacks"),
        (_set("artifacts/layers/ghost", [0]), r"artifacts\.layers names graph 'ghost'"),
        (_set("artifacts/layers/full", [0, 30]), r"artifacts\.layers\.full has layers outside 0\.\.29"),
        (_set("artifacts/draft_vocab/ghost", "x"), r"draft_vocab names draft 'ghost'"),
        (_set("artifacts/draft_vocab/d1", "x"), r"draft_vocab\.d1 names tensor 'x', absent from"),
        (_set("artifacts/files/draft.d1.onnx", None), r"artifacts\.files does not list draft\.d1\.onnx"),
        (_set("artifacts/paired/ghost", "p.onnx"), r"artifacts\.paired names draft 'ghost'"),
        (_set("artifacts/files/paired.d1.onnx", None), r"artifacts\.files does not list paired\.d1\.onnx"),
        (_set("artifacts/max_seq_len", 0), r"artifacts\.max_seq_len must be >= 1"),
    ],
)
def test_a_bad_artifacts_section_names_the_field_and_the_fix(tmp_path, mutate, message):
    data = _built()
    mutate(data)
    fix = "rebuild the artifact with `conflayers-export build`"
    with pytest.raises(ManifestError, match=rf"{message}.*: {fix}"):
        _read(tmp_path, data)


def test_a_bad_vocabulary_ranking_names_the_field_and_calibrate(tmp_path):
    data = _built()
    data["calibration"]["vocabulary"]["ranked_token_ids"][1] = "3"
    with pytest.raises(
        ManifestError, match=r"calibration\.vocabulary\.ranked_token_ids\[1\] must be an integer.*calibrate"
    ):
        _read(tmp_path, data)


def test_a_manifest_without_artifacts_describes_no_built_artifact(tmp_path):
    from conflayers_runtime.artifact import artifact_section

    manifest = _read(tmp_path, _manifest().to_dict())  # written by calibrate: "artifacts": {}
    assert manifest.artifacts is None
    with pytest.raises(ManifestError, match="describes no built artifact.*run `conflayers-export build`"):
        artifact_section(manifest)


def test_the_ranking_goes_in_its_field_not_in_the_free_form_calibration(tmp_path):
    manifest = _manifest()
    manifest.calibration["vocabulary"] = {"ranked_token_ids": [1]}
    with pytest.raises(ManifestError, match="set Manifest.vocabulary instead"):
        write_manifest(manifest, tmp_path)


# --- reading forward: a newer minor version's keys, and mistyped fields -------------------------


def _with_a_key_in_every_section(data: dict) -> list[str]:
    """Add a key no reader of today knows to every object of a built manifest; returns their paths."""
    added = []

    def add(obj: dict, path: str) -> None:
        obj["from_the_future"] = {"nested": [1, 2]}
        added.append(f"{path}.from_the_future" if path else "from_the_future")

    add(data, "")
    add(data["model"], "model")
    add(data["drafts"][0], "drafts[0]")
    add(data["tasks"]["code"], "tasks.code")
    add(data["calibration"]["vocabulary"], "calibration.vocabulary")
    artifacts = data["artifacts"]
    add(artifacts, "artifacts")
    for section in ("kv", "quantization", "tokenizer"):
        add(artifacts[section], f"artifacts.{section}")
    add(artifacts["files"]["weights.bin"], "artifacts.files.weights.bin")
    return added


def test_a_newer_minor_version_with_a_new_key_in_every_section_loads(tmp_path):
    data = _built()
    data["schema_version"] = SCHEMA_VERSION.split(".")[0] + ".99"
    added = _with_a_key_in_every_section(data)
    manifest = _read(tmp_path, data)
    assert sorted(manifest.unknown_keys) == sorted(added)
    assert manifest.draft("d1").skip_layers == [14, 15, 16] and manifest.tasks["code"].draft is None
    assert "from_the_future" not in json.dumps(manifest.to_dict())  # read past, never written back
    assert _read(tmp_path, _built()).unknown_keys == []


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            _set("drafts/0/recommended", "false"),
            r"drafts\[0\]\.recommended must be true or false, got \"false\"",
        ),
        (_set("drafts/0/max_draft_tokens", "4"), r"drafts\[0\]\.max_draft_tokens must be an integer"),
        (_set("drafts/0/confidence_threshold", "0.8"), r"drafts\[0\]\.confidence_threshold must be a number"),
        (_set("drafts/0/skip_layers", "14,15"), r"drafts\[0\]\.skip_layers must be a list"),
        (
            _set("drafts/0/skip_layers", [14, True]),
            r"drafts\[0\]\.skip_layers\[1\] must be a string, got true",
        ),
        (_set("drafts/0/metrics", [0.7]), r"drafts\[0\]\.metrics must be an object"),
        (_set("drafts/0/name", None), r"drafts\[0\]\.name is missing"),
        (_set("drafts", {"d1": {}}), r"drafts must be a list"),
        (_set("tasks/default", "d1"), r"tasks\.default must be an object, got \"d1\""),
        (_set("tasks/default/note", 3), r"tasks\.default\.note must be a string, got 3"),
        (_set("model/num_layers", 30.0), r"model\.num_layers must be an integer, got 30\.0"),
        (_set("model/fingerprint", None), r"model\.fingerprint is missing"),
        (_set("calibration", []), r"calibration must be an object"),
        (_set("tool", {"version": 1}), r"tool\.version must be a string"),
    ],
)
def test_a_mistyped_field_names_itself_and_the_fix(tmp_path, mutate, message):
    data = _built()
    mutate(data)
    with pytest.raises(ManifestError, match=rf"the manifest's {message}.*: (run|rebuild)"):
        _read(tmp_path, data)
