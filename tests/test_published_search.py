"""`calibrate --search published|both`: the reference's outer-loop rules on hand-worked inputs,
then both searches side by side; and the small CLI fixes (build without a manifest,
"acceptance n/a" for plain decoding, validate's per-graph tolerance)."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from conflayers_runtime import GenerationStats

from conflayers_export.calibrate import CalibrationSettings, calibrate
from conflayers_export.calibrate.confidence import CLAMP, block_confidence, select_at_least
from conflayers_export.calibrate.search import Calibrator, SearchPolicy, abandon_early, best_set
from conflayers_export.cli import _worst_per_graph, main
from conflayers_export.export.validate import StepResult
from conflayers_export.models import load_model
from tests.test_calibrate import SMALL  # the same small, deterministic settings

# --- the reference's rules ---------------------------------------------------------------------

PROFILE = [1.0, 1.0, 0.0, 1.0, 1.0]  # test_calibrate's hand-worked profile: layers 1..5 of 7


def test_published_minimum_size_is_int_of_eligible_times_ratio_plus_one():
    assert SearchPolicy.published(28, 0.4).min_size == 12  # int(11.2) + 1
    assert SearchPolicy.published(5, 0.4).min_size == 3  # int(2.0) + 1
    assert SearchPolicy().min_size == 0 and SearchPolicy().abandon_below is None


def test_small_sets_are_reselected_with_lambda_steps_until_big_enough():
    # lambda 0 skips only layer 3 (s = [.5, .5, -2, .5, .5]). Layers 2 and 4 have neighbours
    # {0.5, -2} (mean -0.75, std 1.25): skipped when 0.5 < -0.75 - lambda * 1.25, i.e. lambda < -1.
    # Layers 1 and 5 have one neighbour (std 0): never. With steps of 0.25 (exact in binary):
    # -0.25, -0.5, -0.75, -1.0 (not yet: 0.5 < 0.5 is false), -1.25 -> {2, 3, 4} after 5 steps.
    chosen, lam, steps = select_at_least(PROFILE, 7, 0.0, min_size=3, step=0.25)
    assert (chosen["skip"].tolist(), lam, steps) == ([2, 3, 4], -1.25, 5)
    # Big enough at once: no step.
    chosen, lam, steps = select_at_least(PROFILE, 7, 0.0, min_size=1, step=0.25)
    assert (chosen["skip"].tolist(), lam, steps) == ([3], 0.0, 0)
    # Bounded: after max_steps the set is returned as it is (the search then says so).
    chosen, lam, steps = select_at_least(PROFILE, 7, 0.0, min_size=3, step=0.25, max_steps=3)
    assert (chosen["skip"].tolist(), lam, steps) == ([3], -0.75, 3)


def test_a_flat_profile_skips_nothing_at_any_lambda():
    # float64: z-scores all 0, curvature weights all 0.5, thresholds all 0 -> nothing below them
    # (the reference's float16 min-max divides 0 by 0 here).
    chosen, _, steps = select_at_least([0.7] * 5, 7, 0.0, min_size=3, max_steps=40)
    assert chosen["skip"].tolist() == [] and steps == 40
    np.testing.assert_allclose(chosen["curvature"], 0.5)


def test_early_abandon_rule():
    assert abandon_early(accepted=2, cycles=3, below=1.0)  # 0.67 accepted tokens per cycle
    assert not abandon_early(accepted=3, cycles=3, below=1.0)  # exactly 1 is kept
    assert not abandon_early(accepted=0, cycles=3, below=None)  # the cost-aware search never abandons


def test_evaluate_abandons_at_half_of_the_interval(tiny_folder):
    calibrator = Calibrator(load_model(str(tiny_folder("llama"))), CalibrationSettings())
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    stats, _, abandoned = calibrator.evaluate([1], prompts, max_cycles=6, abandon_below=100.0)
    assert abandoned and stats.verify_passes == 3  # no set accepts 100 tokens per cycle
    stats, _, abandoned = calibrator.evaluate([1], prompts, max_cycles=6, abandon_below=0.0)
    assert not abandoned and stats.verify_passes == 6
    stats, _, abandoned = calibrator.evaluate([1], prompts, max_cycles=6)
    assert not abandoned and stats.verify_passes == 6


def test_the_best_set_by_accepted_tokens_per_cycle_is_restored():
    iterations = [
        {"skip": [1, 3], "accepted_per_cycle": 1.5, "expected_speedup": 0.9},
        {"skip": [2, 3, 4], "accepted_per_cycle": 2.5, "expected_speedup": 0.8},
        {"skip": [3], "accepted_per_cycle": 2.5, "expected_speedup": 1.2},  # a tie: the first wins
        {"skip": [2], "accepted_per_cycle": 0.5, "expected_speedup": 1.5},  # the last is not kept
    ]
    assert best_set(iterations) == [2, 3, 4]


def test_clamp_before_the_entropy():
    assert CLAMP == (pytest.approx(np.log(np.finfo(np.float32).tiny)), 88.7)
    # Two peaks 200 and 150: unclamped, 200 takes all the mass (confidence ~1); clamped both are
    # 88.7, an even split over 2 of 64 entries: entropy log 2, confidence 1 - log 2 / log 64 = 5/6.
    peaks = np.zeros((1, 64))
    peaks[0, :2] = [200.0, 150.0]
    assert block_confidence(peaks) == pytest.approx(1.0, abs=1e-9)
    assert block_confidence(peaks, clamp=True) == pytest.approx(5 / 6)
    # Below log(tiny float32) ~ -87.3 everything is equal: -100 and -200 become a flat pair.
    low = np.array([[-100.0, -200.0]])
    assert block_confidence(low) == pytest.approx(1.0, abs=1e-9)
    assert block_confidence(low, clamp=True) == pytest.approx(0.0, abs=1e-9)


# --- both searches, side by side ---------------------------------------------------------------


def test_search_both_reports_both_choices_and_ships_the_cost_aware_one(tiny_folder, tmp_path):
    loaded = load_model(str(tiny_folder("llama")))
    settings = dataclasses.replace(SMALL, search="both")
    manifest, results = calibrate(tmp_path / "o", loaded, {"default": ["abc", "hello world"]}, settings)
    report = json.loads((tmp_path / "o" / "calibration" / "report.json").read_text())
    choices = report["tasks"][0]["choices"]
    assert set(choices) == {"cost-aware", "published"}
    for choice in choices.values():
        assert {"skip", "acceptance_rate", "mean_tokens_per_cycle", "expected_speedup"} <= set(choice)
    assert choices["cost-aware"]["skip"] == results[0].chosen.skip
    assert manifest.draft("default").metrics["layer_search"]["skip_layers"] == results[0].chosen.skip
    assert report["tasks"][0]["published_iterations"]
    markdown = (tmp_path / "o" / "calibration" / "report.md").read_text()
    assert "| cost-aware **(ships)** |" in markdown and "| published |" in markdown
    assert "float64" in markdown and "float16" in markdown


def test_unknown_search_is_refused(tiny_folder, tmp_path, capsys):
    argv = ["calibrate", "--model", str(tiny_folder("llama")), "--out", str(tmp_path / "o")]
    assert main([*argv, "--search", "online"]) == 2  # click rejects the choice
    assert "online" in capsys.readouterr().err


# --- small fixes -------------------------------------------------------------------------------


def test_build_without_manifest_or_model_is_refused(tmp_path, capsys):
    assert main(["build", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no manifest.json" in err
    assert "conflayers-export calibrate" in err and "--model" in err
    assert not (tmp_path / "empty").exists()


def test_reference_plain_prints_acceptance_na(tiny_folder, capsys):
    argv = ["reference", "--model", str(tiny_folder("llama")), "--prompt", "ab", "--no-chat", "--plain"]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "acceptance n/a" in err and "acceptance 0.00" not in err


class _PlainModel:
    draft = None
    lookup = None
    last_stats = GenerationStats(new_tokens=3, prefill_passes=1, verify_passes=2)

    def resolve_mode(self, mode):
        return "plain"

    def stream(self, prompt, max_new_tokens, **kwargs):
        yield from ["a", "b", "c"]


def test_runtime_plain_prints_acceptance_na(monkeypatch):
    from conflayers_runtime import cli as runtime_cli

    monkeypatch.setattr(runtime_cli, "load", lambda *args, **kwargs: _PlainModel())
    out, err = io.StringIO(), io.StringIO()
    runtime_cli.generate_and_report("unused", "hi", mode="plain", out=out, err=err)
    assert "acceptance n/a" in err.getvalue() and out.getvalue() == "abc\n"
    assert runtime_cli.acceptance_text(0.834, True) == "0.83"


def test_validate_reports_each_graphs_worst_step_with_its_tolerance():
    results = [
        StepResult("full", "prefill-16", 2e-5, True, 1e-3),
        StepResult("full", "step-1", 4e-5, True, 1e-3),
        StepResult("draft.default", "prefill-16", 0.2, True, 2.5),  # 8% of its tolerance
        StepResult("draft.default", "step-1", 0.1, True, 0.5),  # 20%: the closest call
    ]
    worst = _worst_per_graph(results)
    assert list(worst) == ["draft.default", "full"]
    assert worst["draft.default"].step == "step-1" and worst["full"].step == "step-1"


def test_validate_prints_each_graphs_tolerance(tiny_folder, tmp_path, capsys):
    folder = str(tmp_path / "art")
    argv = ["build", folder, "--model", str(tiny_folder("llama")), "--skip", "1", "--max-seq-len", "64"]
    assert main([*argv, "--json"]) == 0
    capsys.readouterr()
    assert main(["validate", folder]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "draft.manual " in line and "paired.manual/draft " in line and "full " in line, line
    # full, draft, the paired graph as both, the tree graph and its paired form as both
    assert line.count("(tolerance 1.00e-03)") == 7, line


def test_search_published_ships_the_published_choice(tiny_folder, tmp_path):
    loaded = load_model(str(tiny_folder("llama")))
    settings = dataclasses.replace(SMALL, search="published")
    manifest, results = calibrate(tmp_path / "o", loaded, {"default": ["abc", "hello world"]}, settings)
    result = results[0]
    assert result.chosen is result.published and list(result.choices()) == ["published"]
    assert manifest.draft("default").metrics["layer_search"]["skip_layers"] == result.published.skip
    # every evaluated set after the start set is at least the minimum size (2 eligible layers: 1)
    assert all(len(it["skip"]) >= 1 for it in result.iterations)
    markdown = (tmp_path / "o" / "calibration" / "report.md").read_text()
    assert "| published **(ships)** |" in markdown


def test_the_cli_offers_exactly_the_searches_calibrate_knows():
    # The CLI spells them out so that --help needs no torch; this keeps the two lists equal.
    from conflayers_export.calibrate.settings import SEARCHES
    from conflayers_export.cli import cli

    option = next(p for p in cli.commands["calibrate"].params if p.name == "search")
    assert tuple(option.type.choices) == SEARCHES
