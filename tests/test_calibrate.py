"""`calibrate`: each step of the ConfLayers search on hand-worked arrays, then the whole command."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re

import numpy as np
import pytest
from conflayers_runtime import GenerationStats, read_manifest
from conflayers_runtime.speculative import DraftScore

from conflayers_export.calibrate import CalibrationSettings, calibrate
from conflayers_export.calibrate.confidence import (
    adapt_lambda,
    block_confidence,
    leading_run,
    mean_half,
    select_skips,
    window_sizes,
    z_normalise,
)
from conflayers_export.calibrate.data import default_prompts, load_prompts
from conflayers_export.calibrate.scoring import EvaluationTexts, graph_bytes
from conflayers_export.calibrate.select import (
    _ceiling,
    _policy_finalists,
    coverage,
    draft_combinations,
    fixed_length_speedups,
    rank_vocabulary,
)
from conflayers_export.cli import main
from conflayers_export.errors import CalibrationError
from conflayers_export.export.build import build_artifact, manifest_for_build
from conflayers_export.export.validate import check_parity
from conflayers_export.models import load_model
from conflayers_export.progress import Progress

# --- the method, step by step ------------------------------------------------------------------


def test_block_confidence_is_zero_for_flat_and_near_one_for_peaked_outputs():
    assert block_confidence(np.zeros((3, 64))) == pytest.approx(0.0, abs=1e-9)
    peaked = np.zeros((2, 64))
    peaked[:, 5] = 50.0
    assert block_confidence(peaked) > 0.99


def test_z_normalisation():
    np.testing.assert_allclose(z_normalise(np.array([1.0, 2.0, 3.0])), [-1.224744, 0.0, 1.224744], atol=1e-5)


def test_leading_run_of_equal_values():
    assert leading_run(np.array([0.0, 0.0, 1.0, 0.0])) == 2
    assert leading_run(np.array([4.0, 4.0, 4.0])) == 3


def test_mean_half_maps_to_mean_one_half_within_unit_interval():
    y = mean_half(np.array([0.0, 0.25, 1.0]))
    # mu = 5/12; scale = min(0.5 / (1 - mu), 0.5 / mu) = 6/7; y = 6/7 (x - mu) + 0.5
    np.testing.assert_allclose(y, [1 / 7, 5 / 14, 1.0], atol=1e-9)
    assert y.mean() == pytest.approx(0.5)
    np.testing.assert_allclose(mean_half(np.array([0.3, 0.3])), [0.5, 0.5])


def test_window_sizes_grow_with_curvature_and_depth():
    g = np.array([0.5, 1.0, 0.0])
    # alpha = 5 * run = 5: w = 2 + int(5 * g_i * (i + 1) / L) with L = 5
    np.testing.assert_array_equal(window_sizes(g, run=1, num_layers=5), [2, 4, 2])
    # Qwen caps alpha at L // 3 = 1
    np.testing.assert_array_equal(window_sizes(g, run=1, num_layers=5, cap_window=True), [2, 2, 2])


def test_select_skips_on_a_hand_worked_profile():
    # Layers 1..5 of a 7-layer model; layer 3 is much less confident than its neighbours.
    result = select_skips([1.0, 1.0, 0.0, 1.0, 1.0], num_layers=7, lam=0.0)
    np.testing.assert_allclose(result["scores"], [0.5, 0.5, -2.0, 0.5, 0.5], atol=1e-5)
    # second difference [-1.25, 0, 1.25, 0, -1.25] -> [0, .5, 1, .5, 0] -> mean 0.5: [1/6, 7/12, 1, 7/12, 1/6]
    np.testing.assert_allclose(result["curvature"], [1 / 6, 7 / 12, 1.0, 7 / 12, 1 / 6], atol=1e-6)
    np.testing.assert_array_equal(result["windows"], [2, 2, 4, 3, 2])
    # thresholds = mean of the neighbours (lambda 0); only layer 3 falls below its own
    np.testing.assert_allclose(result["thresholds"], [0.5, -0.75, 0.5, -0.75, 0.5], atol=1e-5)
    assert result["skip"].tolist() == [3]
    # lambda lowers each threshold by lambda * std(neighbours): layer 3's neighbours agree (std 0),
    # so it stays skipped, while layer 2's threshold drops from -0.75 to -0.75 - 3 * 1.25.
    raised = select_skips([1.0, 1.0, 0.0, 1.0, 1.0], num_layers=7, lam=3.0)
    assert raised["skip"].tolist() == [3]
    assert raised["thresholds"][1] == pytest.approx(-0.75 - 3 * 1.25, abs=1e-4)


def test_lambda_moves_toward_the_target_ratio():
    assert adapt_lambda(0.0, 20, 28, 0.4) == pytest.approx(0.05)  # 0.71 > 0.4 + 0.25: skip fewer
    assert adapt_lambda(0.0, 5, 28, 0.4) == pytest.approx(-0.05)  # 0.18 < 0.4: skip more
    assert adapt_lambda(0.1, 14, 28, 0.4) == pytest.approx(0.1)  # 0.5 is inside the band


def test_expected_speedup_formula():
    stats = GenerationStats(new_tokens=31, prefill_passes=1, verify_passes=10, draft_passes=20)
    # 3 tokens per full pass / (2 drafts per cycle * 0.5 + 1) = 1.5
    score = DraftScore()
    score.scored(stats, c_draft=0.5, c_verify=1.0)
    assert score.expected_speedup == pytest.approx(1.5) and score.acceptance_rate == 0.0


# --- data -----------------------------------------------------------------------------------------


def test_default_data_ships_varied_prompts():
    prompts = default_prompts()
    assert 28 <= len(prompts) <= 40 and len(set(prompts)) == len(prompts)


def test_data_formats_and_errors_name_the_line(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]
    chat = [{"role": "user", "content": "hi"}]
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"prompt": "a"}) + "\n" + json.dumps({"messages": chat}) + "\n"
    )
    assert load_prompts(tmp_path / "c.jsonl") == ["a", chat]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n{oops\n")
    with pytest.raises(CalibrationError, match="bad.jsonl, line 2: not valid JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(CalibrationError, match="line 1: expected an object with a non-empty 'prompt'"):
        load_prompts(tmp_path / "nofield.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CalibrationError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(CalibrationError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")


# --- the command --------------------------------------------------------------------------------

SMALL = CalibrationSettings(
    max_iter=3,
    search_interval=6,
    max_new_tokens=12,
    eval_prompts=2,
    context_window=8,
    ranked_sizes=(1,),
    cost="bytes",  # deterministic
    vocab_sizes=(64,),
    policy_finalists=1,
    draft_policies=((4, 0.0),),
)
PROMPTS = ["abc", "hello world", "the quick fox", "zebra"]


def _calibrate(out, loaded, **kwargs):
    return calibrate(out, loaded, {"default": PROMPTS, "other": PROMPTS[::-1]}, SMALL, **kwargs)


class RecordingProgress(Progress):
    """Each phase's label, its total and how many steps it reported."""

    def __init__(self):
        self.phases: list[list] = []

    @contextlib.contextmanager
    def phase(self, label, total):
        record = [label, total, 0]
        self.phases.append(record)

        def step():
            record[2] += 1

        yield step


def test_calibrate_writes_manifest_and_report_and_is_deterministic(tiny_folder, tmp_path):
    loaded = load_model(str(tiny_folder("llama")))
    progress = RecordingProgress()
    manifest, results = _calibrate(tmp_path / "a", loaded, progress=progress)
    # Every phase reported its steps (the layer search may stop early, at the paper's stop rule).
    assert [label for label, _, _ in progress.phases if "layer search" in label] == [
        "[default] layer search",
        "[other] layer search",
    ]
    assert all(done == total or "layer search" in label for label, total, done in progress.phases)
    assert sum("scoring" in label for label, _, _ in progress.phases) == 3 * 2  # sets, baselines, drafts
    # Every text (both tasks' evaluation prompts and the 4 held-out ones that rank the vocabulary)
    # was generated on the first graphs built, the first task's skip sets: no build of its own.
    assert not any(label.startswith("generating") for label, _, _ in progress.phases)
    assert "(first generating the full model's greedy text of 8 prompts)" in progress.phases[1][0]
    # The chosen draft, run for real, counted what its replay counted.
    assert all(r.drafts.confirmation.matches_replay for r in results)
    assert [d.name for d in manifest.drafts] == ["default", "other"]
    for name in ("report.json", "report.md", "confidence.png"):
        assert (tmp_path / "a" / "calibration" / name).stat().st_size > 0
    written = read_manifest(tmp_path / "a")
    draft = written.draft("default")
    assert set(draft.metrics) >= {"acceptance_rate", "mean_tokens_per_cycle", "c_draft", "expected_speedup"}
    assert draft.recommended == (draft.metrics["expected_speedup"] > 1)
    # The joint stage scored every skip set x precision at its widest vocabulary, the narrower
    # vocabularies of the best vocab_finalists of those only, and the best one ships.
    joint = results[0].drafts
    first = [c for c in joint.candidates if c.max_draft_tokens == SMALL.max_draft_tokens and not c.tree_nodes]
    widest: dict = {}
    for c in first:
        key = (tuple(c.skip), c.weight_precision)
        if key not in widest or (widest[key].vocab_size or 10**9) < (c.vocab_size or 10**9):
            widest[key] = c
    assert {((), "int8"), ((), "int4")} <= set(widest)
    # The full-precision copy of every layer (at a pruned vocabulary: the full model itself is no
    # draft) could not beat the quantized ones even with every draft accepted: left out unscored.
    assert ((), "base") not in widest and joint.left_out["skip -, base"] < joint.chosen.expected_speedup
    longest = max(SMALL.max_draft_tokens, *(tokens for tokens, _ in SMALL.draft_policies))
    assert all(c.expected_speedup <= _ceiling(c.c_draft, longest) for c in joint.candidates)
    assert "Left out unscored" in (tmp_path / "a" / "calibration" / "report.md").read_text()
    finalists = sorted(widest, key=lambda key: -widest[key].expected_speedup)[: SMALL.vocab_finalists]
    narrower = {key for c in first if c is not widest[key := (tuple(c.skip), c.weight_precision)]}
    assert narrower == {key for key in finalists if key != ((), "base")}
    assert len(widest) > SMALL.vocab_finalists  # so that some pair's narrower vocabulary was left out
    best = max(joint.candidates, key=lambda c: c.expected_speedup)
    assert (draft.skip_layers, draft.weight_precision, draft.vocab_size) == (
        best.skip,
        best.weight_precision,
        best.vocab_size,
    )
    assert (draft.max_draft_tokens, draft.confidence_threshold) == (
        best.max_draft_tokens,
        best.confidence_threshold,
    )
    # The bytes model prices every verify pass as one step whatever its rows: no trees then
    # (tests/test_costs.py scores them with a cost table).
    assert {(c.tree_nodes, c.tree_width) for c in joint.candidates} == {(0, 0)}
    assert (draft.tree_nodes, draft.tree_width) == (None, None)
    assert all(0 < c.bytes_ratio < 1 and c.c_draft == c.bytes_ratio for c in joint.candidates)
    assert set(joint.coverage) == {64} and 0 <= joint.coverage[64] <= 1
    ranked = written.vocabulary.ranked_token_ids
    assert len(ranked) == 64 and len(set(ranked)) == 64
    assert written.tasks["default"].draft == "default"
    assert written.calibration["settings"]["skip_ratio"] == 0.4
    report = json.loads((tmp_path / "a" / "calibration" / "report.json").read_text())
    origins = {b["origin"] for b in report["tasks"][0]["baselines"]}
    assert {"start set", "random #1", "random #2", "random #3"} <= origins
    assert any(o.startswith("early exit") for o in origins)
    markdown = (tmp_path / "a" / "calibration" / "report.md").read_text()
    assert "## Task `default`" in markdown and "### Draft that ships" in markdown

    again, _ = _calibrate(tmp_path / "b", loaded)
    assert _timeless(again) == _timeless(manifest)

    # The manifest feeds build directly.
    built = build_artifact(tmp_path / "a", loaded, manifest_for_build(tmp_path / "a", loaded), max_seq_len=64)
    assert set(built.artifacts.drafts) == {"default", "other"}
    check_parity(tmp_path / "a", loaded)
    assert (tmp_path / "a" / "calibration" / "report.md").is_file(), "build must keep the report"


def test_a_calibration_without_baselines_scores_the_same_sets_and_says_so(tiny_folder, tmp_path):
    loaded = load_model(str(tiny_folder("llama")))
    progress = RecordingProgress()
    settings = dataclasses.replace(SMALL, baselines=False, confirm_prompts=1)
    manifest, results = calibrate(tmp_path / "a", loaded, {"default": PROMPTS}, settings, progress=progress)
    # The real run confirmed the first evaluation prompt alone, and counted what a replay of it counts.
    assert results[0].drafts.confirmation.prompts == 1 and results[0].drafts.confirmation.matches_replay
    # One scoring of skip sets (no second one for the baselines), then the drafts'.
    assert sum("scoring" in label for label, _, _ in progress.phases) == 2
    assert results[0].baselines == [] and results[0].best_baseline is None
    layer_search = manifest.draft("default").metrics["layer_search"]
    assert (
        layer_search["best_baseline_speedup"] is None and layer_search["conflayers_beats_baselines"] is None
    )
    assert "Baselines not scored" in (tmp_path / "a" / "calibration" / "report.md").read_text()
    _, with_baselines = calibrate(tmp_path / "b", loaded, {"default": PROMPTS}, SMALL)
    assert results[0].finalists == with_baselines[0].finalists and with_baselines[0].baselines
    assert with_baselines[0].drafts.confirmation.prompts == SMALL.eval_prompts


def test_calibrate_refuses_another_models_folder_unless_forced(tiny_folder, tmp_path):
    _calibrate(tmp_path / "out", load_model(str(tiny_folder("llama"))))
    other = load_model(str(tiny_folder("qwen2")))
    with pytest.raises(CalibrationError, match="another model.*--force"):
        _calibrate(tmp_path / "out", other)
    manifest, _ = _calibrate(tmp_path / "out", other, force=True)
    assert read_manifest(tmp_path / "out").model.architecture == "qwen2"


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_skip_ratio_outside_0_1_is_refused(tiny_folder, tmp_path, ratio, capsys):
    argv = [
        "calibrate",
        "--model",
        str(tiny_folder("llama")),
        "--out",
        str(tmp_path / "o"),
        "--skip-ratio",
        str(ratio),
    ]
    assert main(argv) == 1
    assert "--skip-ratio must be in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_calibrate_json(tiny_folder, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("abc\nhello\n")
    config = tmp_path / "calibrate.toml"
    config.write_text("search_interval = 4\nmax_iter = 5\n")
    argv = ["calibrate", "--model", str(tiny_folder("mistral")), "--out", str(tmp_path / "o")]
    argv += ["--data", str(data), "--config", str(config), "--max-iter", "2", "--max-new-tokens", "8"]
    argv.append("--json")
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"][0]["task"] == "default" and "expected_speedup" in result["tasks"][0]
    search = json.loads((tmp_path / "o" / "calibration" / "search.json").read_text())
    assert search["settings"]["search_interval"] == 4  # from the file
    assert search["settings"]["max_iter"] == 2  # the option overrides the file


def _settings_from(argv, tmp_path, monkeypatch):
    """The settings `calibrate` would run with (it stops right after checking them)."""
    from conflayers_export import calibrate as calibrate_module

    seen = []

    def stop(settings):
        seen.append(settings)
        raise CalibrationError("stopped after the settings")

    monkeypatch.setattr(calibrate_module, "check_settings", stop)
    assert main(["calibrate", "--out", str(tmp_path / "o"), *argv]) == 1
    return seen[0]


def test_the_config_file_sets_what_the_options_leave(tmp_path, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text(
        "# every kind of value\n"
        "context_window = 16\nskip_ratio = 0.3\nconfidence_threshold = 1\nthreads = 2\n"
        'precisions = ["base", "int4"]\nvocab_sizes = []\ntree_shapes = [[2, 2]]\n'
        "draft_policies = [[6, 0.0], [12, 0.3]]\n"
        'reference_dtype = "bfloat16"\ndevice_map = "cpu"\ncost = "bytes"\n'
    )
    settings = _settings_from(["--config", str(config), "--skip-ratio", "0.5"], tmp_path, monkeypatch)
    assert settings == CalibrationSettings(
        context_window=16,
        skip_ratio=0.5,  # the option wins
        confidence_threshold=1.0,
        threads=2,
        precisions=("base", "int4"),
        vocab_sizes=(),
        tree_shapes=((2, 2),),
        draft_policies=((6, 0.0), (12, 0.3)),
        reference_dtype="bfloat16",
        device_map="cpu",
        cost="bytes",
    )
    # Without a file: the defaults, the reference where the graphs run
    assert _settings_from([], tmp_path, monkeypatch) == CalibrationSettings()
    cuda = _settings_from(["--device", "cuda", "--dtype", "fp16"], tmp_path, monkeypatch)
    assert (cuda.reference_device, cuda.reference_dtype) == ("cuda", "float16")


@pytest.mark.parametrize(
    "text, message",
    [
        ("contxt_window = 3", "unknown key 'contxt_window': did you mean 'context_window'?"),
        ("max_iter = true", "key 'max_iter' must be an integer, got True"),
        ("threads = 1.5", "key 'threads' must be an integer, got 1.5"),
        ('precisions = "int8"', r"key 'precisions' must be a list like \[\"base\", \"base\"\]"),
        ("tree_shapes = [[1, 1], [2]]", r"key 'tree_shapes' must be a list like \[\[8, 8\], \[8, 8\]\]"),
        ("draft_policies = [[8, 'x']]", r"key 'draft_policies' must be a list like \[\[8, 0.5\]"),
        ("max_iter = [", "is not valid TOML.*fix the file given to --config"),
        ("search_interval = 0", r"search_interval \(--config file\) must be >= 1, got 0"),
        ("vocab_finalists = -1", r"vocab_finalists \(--config file\) must be >= 0, got -1"),
        ("baselines = 0", "key 'baselines' must be true or false, got 0"),
        ('precisions = ["int2"]', r"unknown draft precision\(s\) \['int2'\] in precisions \(--config file\)"),
    ],
)
def test_a_bad_config_file_is_refused_naming_the_key(tiny_folder, tmp_path, capsys, text, message):
    config = tmp_path / "c.toml"
    config.write_text(text + "\n")
    argv = ["calibrate", "--model", str(tiny_folder("llama")), "--out", str(tmp_path / "o")]
    assert main([*argv, "--config", str(config)]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
    assert main([*argv, "--config", str(tmp_path / "none.toml")]) == 1
    assert "no calibration config at" in capsys.readouterr().err


@pytest.mark.real_model
def test_calibrate_on_smollm2_runs_and_says_whether_to_speculate(smollm2, tmp_path):
    settings = CalibrationSettings(
        max_iter=2,
        search_interval=8,
        max_new_tokens=16,
        eval_prompts=1,
        finalists=1,
        ranked_sizes=(),
        precisions=("base", "int8"),
        vocab_sizes=(8192,),
        ranking_prompts=2,
        policy_finalists=1,
        draft_policies=((6, 0.0),),
    )
    manifest, results = calibrate(tmp_path / "s", smollm2, {"default": default_prompts()[:3]}, settings)
    result = results[0]
    assert 1 <= len(result.chosen.skip) <= 28 and 0 not in result.chosen.skip and 29 not in result.chosen.skip
    chosen = result.drafts.chosen
    assert manifest.drafts[0].recommended == (chosen.expected_speedup > 1)
    assert all(0 < c.c_draft < 1.5 and c.c_verify > 0 for c in result.drafts.candidates)  # timed
    # One draft, one c_draft: its draft lengths and token trees are all priced with its first timing
    # (timing noise must not choose among them); the chosen draft was scored several times.
    by_draft: dict = {}
    for c in result.drafts.candidates:
        by_draft.setdefault((tuple(c.skip), c.weight_precision, c.vocab_size), []).append(c.c_draft)
    assert all(len(set(costs)) == 1 for costs in by_draft.values())
    assert max(len(costs) for costs in by_draft.values()) >= 3
    # int8 weights read about a quarter of the fp32 bytes; a pruned head reads fewer still.
    int8 = next(
        c
        for c in result.drafts.candidates
        if not c.skip and c.weight_precision == "int8" and not c.vocab_size
    )
    assert 0.2 < int8.bytes_ratio < 0.35
    pruned = next(
        c for c in result.drafts.candidates if c.vocab_size == 8192 and c.weight_precision == "int8"
    )
    assert pruned.bytes_ratio < int8.bytes_ratio


def test_layer_search_costs_are_the_bytes_model(tiny_folder):
    from conflayers_export.calibrate.search import Calibrator

    loaded = load_model(str(tiny_folder("llama")))
    # (bytes of the kept layers + the output head) / (all layers + head).
    layers = [sum(p.numel() * 4 for p in layer.parameters()) for layer in loaded.model.model.layers]
    head = loaded.model.lm_head.weight.numel() * 4
    expected = (layers[0] + layers[3] + head) / (sum(layers) + head)
    assert Calibrator(loaded, CalibrationSettings()).cost([1, 2]) == (pytest.approx(expected), 1.0)


# --- the joint draft search, piece by piece -------------------------------------------------------


def test_vocabulary_ranking_puts_stop_tokens_then_frequent_tokens_first():
    counts = np.array([0, 0, 1, 1, 0, 2, 0, 3, 0, 1])
    ranked = rank_vocabulary(counts, stop_token_ids=[3])
    assert ranked[:4] == [3, 7, 5, 2]  # stop token, then by count (7: 3, 5: 2), ties by id (2 < 9)
    assert ranked[4] == 9 and ranked[5:] == [0, 1, 4, 6, 8] and len(ranked) == 10
    assert coverage(ranked, [[7, 7, 1, 3]], [2, 4]) == {2: 0.75, 4: 0.75}


def test_draft_combinations_skip_the_full_model_and_precisions_that_save_nothing():
    fp32 = draft_combinations([[], [2]], CalibrationSettings(vocab_sizes=(100, 1000)), vocab_size=500)
    assert ([], "base", None) not in fp32 and ([], "base", 100) in fp32 and ([2], "base", None) in fp32
    assert not any(size == 1000 for _, _, size in fp32)  # not below the vocabulary: no pruning
    assert len(fp32) == 2 * 3 * 2 - 1
    int4 = draft_combinations([[]], CalibrationSettings(dtype="int4", vocab_sizes=(100,)), vocab_size=500)
    # int8 reads more than int4 weights and int4 is the artifact's own; the unchanged graph is the
    # full graph itself (both compute with int8 activations).
    assert int4 == [([], "base", 100)]


def test_fixed_length_speedups_on_a_hand_worked_histogram():
    # 4 cycles of 2 drafts: one accepted none, one 1, two both. At length 1 a cycle accepts
    # min(a, 1): 3 of 4, so 1.75 tokens for one draft pass (0.5) and a verify pass of 2 rows (1.0);
    # at length 2, 1 + 3/4 + 2/4 = 2.25 tokens for two draft passes and 3 rows (1.2).
    speedups = fixed_length_speedups([1, 1, 2], 0.5, {2: 1.0, 3: 1.2})
    assert speedups == pytest.approx({1: 1.75 / 1.5, 2: 2.25 / 2.2})
    assert fixed_length_speedups([], 0.5, {2: 1.0}) == {1: 0.0}  # no cycle: nothing to gain


def test_the_ceiling_of_a_draft_is_every_draft_accepted_at_one_step_a_verify():
    assert _ceiling(0.5, 8) == pytest.approx(9 / 5)
    assert _ceiling(0.25, 12) == pytest.approx(13 / 4)
    assert _ceiling(1.2, 8) == 1.0  # no draft dearer than a step pays


def test_policy_finalists_are_distinct_pairs_each_at_its_best_vocabulary():
    from types import SimpleNamespace

    from conflayers_runtime.manifest import Draft

    def scored(name, skip, precision, vocab, speedup):
        candidate = SimpleNamespace(expected_speedup=speedup, vocab_size=vocab)
        return Draft(name, skip, vocab, precision), candidate

    pairs = [
        scored("a", [], "int4", None, 1.39),
        scored("b", [], "int4", 32768, 1.48),
        scored("c", [], "int4", 8192, 1.38),
        scored("d", [3], "int8", None, 1.38),
        scored("e", [], "int8", None, 1.37),
        scored("f", [3], "int4", None, 1.35),
    ]
    assert [d.name for d in _policy_finalists(pairs, 3)] == ["b", "d", "e"]
    assert [d.name for d in _policy_finalists(pairs, 9)] == ["b", "d", "e", "f"]
    # A pruned vocabulary ahead of its pair's full one by less than PRUNED_VOCABULARY_MARGIN (1.40
    # against 1.39: timing noise) does not represent the pair; the full vocabulary does.
    pairs[1] = scored("b", [], "int4", 32768, 1.40)
    assert [d.name for d in _policy_finalists(pairs, 3)] == ["a", "d", "e"]


def test_graph_bytes_count_what_a_step_reads(tiny_folder, tmp_path):
    from tests.helpers import build

    loaded = load_model(str(tiny_folder("qwen2", tie_word_embeddings=False)))
    build(tmp_path / "a", loaded, {"mid": [1, 2]})
    section = read_manifest(tmp_path / "a").artifacts
    sizes = {name: entry.length for name, entry in section.weights_index.items()}
    full = graph_bytes(tmp_path / "a" / section.full)
    # Every weight of the full graph except the untied embedding table (one row per token).
    read = sum(sizes[n] for n in section.graph_weights[section.full] if n != "model.embed_tokens.weight")
    assert full == read
    assert graph_bytes(tmp_path / "a" / section.drafts["mid"]) < full


def test_nothing_cheaper_than_the_full_graph_is_a_clear_error(tiny_folder):
    from conflayers_export.calibrate.select import DraftSearch

    loaded = load_model(str(tiny_folder("llama")))
    search = DraftSearch(loaded, CalibrationSettings(precisions=("base",), vocab_sizes=()))
    with pytest.raises(CalibrationError, match="no draft to score.*allow int8/int4"):
        search.run("default", [[]], EvaluationTexts([[1, 2, 3]], 8), list(range(256)))


def test_the_layer_search_finds_a_planted_redundant_layer(make_tiny, tmp_path):
    """A layer whose attention and MLP write nothing (output projections zeroed) is an identity:
    its blocks' outputs are flat (confidence 0, the lowest score), and a draft skipping it computes
    the full model's logits exactly. The search must skip it in every set, rank it first, and
    measure a perfect draft; without the plant, the ranked-first layer is another one."""
    import torch

    from conflayers_export.calibrate.scoring import EvaluationTexts, generate_texts, score_layer_sets
    from conflayers_export.calibrate.search import Calibrator, SearchPolicy
    from tests.helpers import write_tiny_folder

    planted = 5
    model, _ = make_tiny("llama", seed=3, num_hidden_layers=8)
    with torch.no_grad():
        layer = model.model.layers[planted]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    loaded = load_model(str(write_tiny_folder(model, tmp_path / "planted")))
    settings = dataclasses.replace(SMALL, max_iter=4, skip_ratio=0.2)
    progress = Progress()
    prompts = [loaded.encode(p) for p in PROMPTS]
    evaluation = EvaluationTexts(prompts[: settings.eval_prompts], settings.max_new_tokens)
    generate_texts(loaded, settings, [evaluation], progress)
    calibrator = Calibrator(loaded, settings, progress)

    def scorer(sets):
        return score_layer_sets(loaded, settings, sets, evaluation, calibrator.cost, progress)

    result = calibrator.run("default", prompts, scorer)
    assert all(planted in it["skip"] for it in result.iterations[1:])  # iteration 0: the start set
    ranked = next(c for c in result.finalists if c.origin == "confidence-ranked (k=1)")
    assert ranked.skip == [planted] and ranked.acceptance_rate == 1.0
    assert planted in result.chosen.skip
    # Control: the same model without the plant scores another layer lowest.
    model, _ = make_tiny("llama", seed=3, num_hidden_layers=8)
    unplanted = load_model(str(write_tiny_folder(model, tmp_path / "unplanted")))
    for candidate, lowest_is_planted in ((loaded, True), (unplanted, False)):
        _, scores, _, _ = Calibrator(candidate, settings, progress)._search(
            "default", prompts, SearchPolicy()
        )
        lowest = 1 + int(np.argmin(np.mean(scores, axis=0)))  # eligible layers start at 1
        assert (lowest == planted) == lowest_is_planted


def test_the_search_ranks_a_planted_dead_mlp_block_as_a_block(make_tiny, tmp_path):
    """An MLP that writes nothing (down projection zeroed) while its layer's attention works: the
    block-ranked finalist of one block skips exactly that MLP and drafts perfectly; a whole-layer
    skip of that layer would also drop its attention. Without the plant another block ranks first."""
    import torch

    from conflayers_export.calibrate.scoring import EvaluationTexts, generate_texts, score_layer_sets
    from conflayers_export.calibrate.search import Calibrator
    from tests.helpers import write_tiny_folder

    settings = dataclasses.replace(SMALL, max_iter=3, skip_ratio=0.2, ranked_sizes=(1,))
    progress = Progress()
    first_blocks = {}
    for planted in (True, False):
        model, _ = make_tiny("llama", seed=3, num_hidden_layers=8)
        if planted:
            with torch.no_grad():
                model.model.layers[5].mlp.down_proj.weight.zero_()
        loaded = load_model(str(write_tiny_folder(model, tmp_path / f"planted-{planted}")))
        prompts = [loaded.encode(p) for p in PROMPTS]
        evaluation = EvaluationTexts(prompts[: settings.eval_prompts], settings.max_new_tokens)
        generate_texts(loaded, settings, [evaluation], progress)
        calibrator = Calibrator(loaded, settings, progress)

        def scorer(sets, loaded=loaded, evaluation=evaluation, calibrator=calibrator):
            return score_layer_sets(loaded, settings, sets, evaluation, calibrator.cost, progress)

        result = calibrator.run("default", prompts, scorer)
        block = next(c for c in result.finalists if c.origin == "confidence-ranked blocks (k=1)")
        first_blocks[planted] = block.skip
        if planted:
            assert block.acceptance_rate == 1.0
            assert calibrator.cost(["5.mlp"])[0] < 1.0 and calibrator.cost(["5.mlp"]) > calibrator.cost([5])
    assert first_blocks[True] == ["5.mlp"] and first_blocks[False] != ["5.mlp"]


def _timeless(manifest):
    """The manifest without wall-clock timings (everything else must repeat exactly)."""
    data = manifest.to_dict()
    for d in data["drafts"]:
        d["metrics"].pop("wall_clock_speedup")
    return data


def test_the_two_stages_stand_alone_and_make_what_calibrate_makes(tiny_folder, tmp_path):
    from conflayers_export.calibrate import search_layers, select_drafts

    loaded = load_model(str(tiny_folder("llama")))
    whole, _ = _calibrate(tmp_path / "whole", loaded)
    tasks = {"default": PROMPTS, "other": PROMPTS[::-1]}
    searched = search_layers(tmp_path / "staged", loaded, tasks, SMALL)
    assert (tmp_path / "staged" / "calibration" / "search.json").is_file()
    assert not (tmp_path / "staged" / "manifest.json").exists()
    staged, results = select_drafts(tmp_path / "staged", loaded, SMALL)  # reads search.json
    assert _timeless(staged) == _timeless(whole)
    assert [r.chosen for r in results] == [r.chosen for r in searched]
    # A selection for another dtype reuses the search; the search's record stays for the next one.
    int4, _ = select_drafts(tmp_path / "staged", loaded, dataclasses.replace(SMALL, dtype="int4"))
    assert int4.calibration["settings"]["dtype"] == "int4"
    assert [d.skip_layers for d in int4.drafts] != [] and (
        tmp_path / "staged" / "calibration" / "search.json"
    ).is_file()


def test_selection_without_a_search_or_for_another_model_is_a_clear_error(tiny_folder, tmp_path):
    from conflayers_export.calibrate import search_layers, select_drafts

    loaded = load_model(str(tiny_folder("llama")))
    with pytest.raises(
        CalibrationError, match="search.json is missing: run `conflayers-export calibrate --stage search"
    ):
        select_drafts(tmp_path / "none", loaded, SMALL)
    search_layers(tmp_path / "s", loaded, {"default": PROMPTS}, SMALL)
    other = load_model(str(tiny_folder("qwen2")))
    with pytest.raises(CalibrationError, match="holds a search of another model"):
        select_drafts(tmp_path / "s", other, SMALL)
    (tmp_path / "s" / "calibration" / "search.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="is corrupt"):
        select_drafts(tmp_path / "s", loaded, SMALL)


def test_the_layer_search_runs_its_reference_where_and_in_what_precision_asked(tiny_folder, tmp_path):
    """--reference-device, reference_dtype and device_map (on a GPU: cuda, float16, auto), checked
    here with bfloat16 and accelerate's device_map on the CPU: the search's reference and its
    layer profiles run on that model; graphs are still built from the float32 model."""
    import torch

    from conflayers_export.calibrate import search_layers
    from conflayers_export.calibrate.search import Calibrator

    loaded = load_model(str(tiny_folder("llama")))
    settings = dataclasses.replace(SMALL, reference_dtype="bfloat16", device_map="cpu")
    calibrator = Calibrator(loaded, settings)
    assert calibrator.reference is not loaded.model and calibrator.reference.dtype == torch.bfloat16
    assert loaded.model.dtype == torch.float32
    results = search_layers(tmp_path / "s", loaded, {"default": PROMPTS}, settings)
    assert results[0].iterations and results[0].finalists
    assert Calibrator(loaded, SMALL).reference is loaded.model  # the default: no second copy
    # The same search over a streamed model (structure only: what the CLI loads in this case)
    streamed = load_model(str(tiny_folder("llama")), streamed=True)
    again = search_layers(tmp_path / "streamed", streamed, {"default": PROMPTS}, settings)
    assert again[0].as_dict() == {**results[0].as_dict(), "seconds": again[0].as_dict()["seconds"]}
    assert not any(p.is_meta for p in Calibrator(streamed, SMALL).reference.parameters())
    if not torch.cuda.is_available():  # this machine: the GPU route is refused with the fix
        with pytest.raises(
            CalibrationError, match="sees none: install a CUDA build of torch.*--reference-device cpu"
        ):
            search_layers(
                tmp_path / "g",
                loaded,
                {"default": PROMPTS},
                dataclasses.replace(SMALL, reference_device="cuda"),
            )
    message = r"reference_dtype \(--config file\) must be one of float32, float16, bfloat16"
    with pytest.raises(CalibrationError, match=message):
        search_layers(
            tmp_path / "t", loaded, {"default": PROMPTS}, dataclasses.replace(SMALL, reference_dtype="int8")
        )


def test_every_calibration_setting_is_documented_for_the_config_file():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "CALIBRATE_CONFIG.md").read_text()
    missing = [f.name for f in dataclasses.fields(CalibrationSettings) if f"| `{f.name}` |" not in doc]
    assert not missing, f"docs/CALIBRATE_CONFIG.md lacks {missing}"
