"""Drafts priced by costs measured on the target device: the cost model's fit,
`conflayers-run profile` on a profiling artifact, and `calibrate --costs`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
from conflayers_runtime import CostTableError, read_manifest
from conflayers_runtime.cli import main as run_main
from conflayers_runtime.costs import (
    CostTable,
    DraftTiming,
    LinearCost,
    fit_costs,
    read_cost_table,
    write_cost_table,
)
from conflayers_runtime.speculative import fastest_passes

from conflayers_export.calibrate import search_layers, select_drafts
from conflayers_export.calibrate.costs import profiling_drafts
from conflayers_export.cli import main as export_main
from conflayers_export.errors import CalibrationError
from conflayers_export.models import load_model
from tests.helpers import build
from tests.test_calibrate import PROMPTS, SMALL

KNOWN = {
    "base": LinearCost(0.05, 0.031, 2e-6),
    "int8": LinearCost(0.08, 0.012, 6e-7),
    "int4": LinearCost(0.11, 0.009, 4e-7),
}


def _timings(cost) -> list[DraftTiming]:
    """The profiling artifact's drafts for SmolLM2's shape (30 layers, 49152 tokens), each timed at
    ``cost(precision, kept layers, columns)``."""
    timings = []
    for d in profiling_drafts(30, 49152, "fp32"):
        kept, columns = 30 - len(d.skip_layers), d.vocab_size or 49152
        timings.append(
            DraftTiming(d.name, d.weight_precision, kept, columns, cost(d.weight_precision, kept, columns))
        )
    return timings


def test_the_fit_recovers_known_coefficients_exactly_and_reports_what_is_not_linear():
    timings = _timings(lambda p, kept, columns: KNOWN[p](kept, columns))
    assert {(t.kept_layers, t.columns) for t in timings} == {
        (30, 49152), (23, 49152), (16, 49152), (30, 6144), (16, 6144)
    }  # fmt: skip
    fitted = fit_costs(timings)
    for precision, known in KNOWN.items():
        got = dataclasses.astuple(fitted[precision])
        assert got == pytest.approx(dataclasses.astuple(known), rel=1e-9, abs=1e-12)
    assert all(
        t.predicted == pytest.approx(t.measured) and t.held_out == pytest.approx(t.measured) for t in timings
    )

    # Control: a cost that grows faster than the kept layers is no line; the fit says so.
    curved = _timings(lambda p, kept, columns: KNOWN[p](kept, columns) + 0.002 * (kept - 16) ** 2)
    fitted = fit_costs(curved)
    assert fitted["base"].per_layer != pytest.approx(KNOWN["base"].per_layer, rel=0.05)
    table = dataclasses.replace(_table(fitted), drafts=curved)
    assert table.max_error > 0.02 and table.max_held_out_error > table.max_error

    # Control: drafts of one kept-layer count cannot separate the layers from the fixed cost.
    flat = [t for t in _timings(lambda p, kept, columns: KNOWN[p](kept, columns)) if t.kept_layers == 30]
    with pytest.raises(
        CostTableError, match="base drafts cannot determine the cost model.*--stage profile-artifact"
    ):
        fit_costs(flat)
    # A fit to noisy timings that prices a draft at or below zero is refused where it is used.
    with pytest.raises(
        CostTableError, match="at -0.460 steps \\(not positive.*profile again on a quiet machine"
    ):
        _table({"base": LinearCost(-0.5, 0.01, 0.0)}).draft_cost("base", 4, 256)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _OnDeviceBackend:
    """Chooses greedy tokens on the device: a step costs 1, a draft pass 0.3; the 3rd-8th timed
    calls are slowed by other work. Logits brought to the host (forward) would cost 10 more."""

    chooses_on_device = True

    def __init__(self, clock):
        self.clock, self.calls = clock, 0

    def forward(self, token_ids, start, use_draft):
        self.clock.now += 10.0

    def greedy(self, token_ids, start, use_draft):
        self.calls += 1
        self.clock.now += (0.3 if use_draft else 1.0) + (5.0 if 3 <= self.calls - 2 <= 8 else 0.0)
        return [0] * len(token_ids), None


def test_passes_are_timed_as_greedy_decoding_runs_them_fastest_of_interleaved_repeats(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("time.perf_counter", clock)
    seconds = fastest_passes(_OnDeviceBackend(clock), {"step": ([1], False), "draft": ([1], True)}, repeats=6)
    assert seconds == {"step": pytest.approx(1.0), "draft": pytest.approx(0.3)}


@pytest.fixture(scope="module")
def profiled(tiny_folder, tmp_path_factory):
    """(profiling artifact, its cost table) of the tiny llama, both made through the two CLIs."""
    tmp = tmp_path_factory.mktemp("profiled")
    argv = ["calibrate", "--model", str(tiny_folder("llama")), "--out", str(tmp / "prof")]
    assert export_main([*argv, "--stage", "profile-artifact", "--quiet"]) == 0
    assert (
        run_main(
            ["profile", str(tmp / "prof"), "--threads", "1", "--repeats", "3", "--out", str(tmp / "c.json")]
        )
        == 0
    )
    return tmp / "prof", tmp / "c.json"


def test_profile_writes_a_table_that_reads_back_and_prices_every_draft(profiled, capsys):
    folder, path = profiled
    manifest, table = read_manifest(folder), read_cost_table(path)
    assert len(manifest.drafts) == 15 and manifest.calibration["purpose"].startswith("profiling")
    assert (table.device, table.artifact_dtype, table.threads) == ("cpu", "fp32", 1)
    assert (table.fingerprint, table.num_layers, table.vocab_size) == (manifest.model.fingerprint, 4, 256)
    assert table.onnxruntime and table.step_seconds > 0 and sorted(table.verify) == list(range(2, 17))
    assert set(table.coefficients) == {"base", "int8", "int4"}
    assert [t.name for t in table.drafts] == [d.name for d in manifest.drafts]
    for t in table.drafts:  # every draft measured, and priced by the fitted model
        assert t.measured > 0 and t.predicted == pytest.approx(
            table.draft_cost(t.precision, t.kept_layers, t.columns)
        )
        assert t.held_out is not None
    assert read_cost_table(path) == table and json.loads(path.read_text())["max_error"] == table.max_error
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # written atomically

    # The profiling artifact is rebuilt in place; another folder is replaced only when forced.
    other = folder.parent / "other"
    build(other, load_model(manifest.model.source), {"mid": [1]}, max_seq_len=96)
    argv = ["calibrate", "--model", manifest.model.source, "--out", str(other), "--stage", "profile-artifact"]
    capsys.readouterr()
    assert export_main([*argv, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no profiling artifact" in err and "--force" in err
    # ...and the runtime refuses to fit an artifact whose drafts cannot determine the model.
    assert run_main(["profile", str(other), "--out", str(folder.parent / "x.json")]) == 1
    err = capsys.readouterr().err
    assert "cannot determine the cost model" in err and "--stage profile-artifact" in err
    assert not (folder.parent / "x.json").exists()


def test_a_missing_or_corrupt_table_is_a_clear_error(profiled, tmp_path):
    with pytest.raises(CostTableError, match="no cost table at .*conflayers-run profile"):
        read_cost_table(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    for text, message in [
        ("{not json", "is not valid JSON"),
        ('{"format": "other"}', "is not a cost table"),
        ('{"format": "conflayers-cost-table", "version": 9}', "of version 9; this runtime reads version 1"),
        ('{"format": "conflayers-cost-table", "version": 1, "device": "cpu"}', "is a malformed cost table"),
    ]:
        bad.write_text(text)
        with pytest.raises(CostTableError, match=message + ".*conflayers-run profile"):
            read_cost_table(bad)


def _table(coefficients, fingerprint="sha256:x", dtype="fp32") -> CostTable:
    return CostTable(
        device="cuda",
        threads=None,
        onnxruntime="test",
        artifact_dtype=dtype,
        model_source="tiny",
        fingerprint=fingerprint,
        num_layers=4,
        vocab_size=256,
        context=64,
        repeats=1,
        step_seconds=1e-3,
        verify={rows: 1 + 0.05 * (rows - 1) for rows in range(2, 17)},
        coefficients=coefficients,
        drafts=[DraftTiming("d", "base", 4, 256, 1.0, 1.0)],
        path="synthetic.json",
    )


def _cheap(loaded, precision: str) -> CostTable:
    """A table where drafts of ``precision`` cost almost nothing and every other draft 3 steps."""
    return _table(
        {p: LinearCost(0.01 if p == precision else 3.0, 0.001, 1e-5) for p in KNOWN},
        loaded.identity.fingerprint,
    )


def test_calibrate_prices_drafts_from_the_table_and_refuses_one_of_another_model_or_dtype(
    tiny_folder, tmp_path, capsys
):
    loaded = load_model(str(tiny_folder("llama")))
    search_layers(tmp_path / "c", loaded, {"default": PROMPTS}, SMALL)
    settings = dataclasses.replace(SMALL, cost="table")
    chosen, fixed_lengths = {}, []
    for precision in ("int4", "int8"):  # each table makes another precision cheap: the choice follows
        table = _cheap(loaded, precision)
        manifest, results = select_drafts(tmp_path / "c", loaded, settings, costs=table)
        chosen[precision] = manifest.drafts[0].weight_precision
        for c in results[0].drafts.candidates:
            kept, columns = 4 - len(c.skip), c.vocab_size or 256
            assert c.c_draft == pytest.approx(table.coefficients[c.weight_precision](kept, columns))
            if not c.tree_nodes:  # a tree's verify pass also holds its alternatives
                assert c.c_verify == table.verify[max(2, round(c.draft_passes_per_cycle) + 1)]
            assert c.c_verify in table.verify.values()
        assert (
            manifest.drafts[0].metrics["cost_source"].startswith("cost table synthetic.json measured on cuda")
        )
        # Token trees scored on the chosen draft, their verify passes priced at their rows; the
        # manifest ships the chain or the tree with the best expected speedup.
        candidates = results[0].drafts.candidates
        assert {(c.tree_nodes, c.tree_width) for c in candidates} >= set(settings.tree_shapes)
        best = max(candidates, key=lambda c: c.expected_speedup)
        assert manifest.drafts[0].tree_nodes == (best.tree_nodes or None)
        # The chosen draft priced in a loop that drafts a fixed length every cycle (a pruned
        # vocabulary is not: onnxruntime-genai cannot verify it); the best length ships.
        draft = manifest.drafts[0]
        if draft.vocab_size is None:
            fixed = {int(k): v for k, v in draft.metrics["fixed_length_expected_speedup"].items()}
            assert list(fixed) == list(range(1, settings.fixed_length_max + 1))
            assert draft.fixed_length_tokens == max(fixed, key=lambda k: fixed[k])
            fixed_lengths.append(draft.fixed_length_tokens)
        else:
            assert draft.fixed_length_tokens is None and results[0].drafts.fixed_length is None
    assert chosen == {"int4": "int4", "int8": "int8"}
    assert fixed_lengths  # at least one chosen draft reads the full vocabulary

    # Through the CLI: a table of another model, of another dtype, or beside another --cost is refused.
    path = tmp_path / "costs.json"
    argv = ["calibrate", "--model", str(tiny_folder("llama")), "--out", str(tmp_path / "o"), "--quiet"]
    for table, extra, message in [
        (_table(KNOWN), [], "measured for another model"),
        (_cheap(loaded, "int4"), ["--dtype", "int4"], "on a fp32 artifact, not int4: pass --dtype fp32"),
        (_cheap(loaded, "int4"), ["--cost", "bytes"], "prices the drafts itself: drop --cost bytes"),
        (dataclasses.replace(_table({"base": KNOWN["base"]}), fingerprint=loaded.identity.fingerprint), [],
         "no cost model for int8, int4 drafts"),
    ]:  # fmt: skip
        write_cost_table(table, path)
        assert export_main([*argv, "--costs", str(path), *extra]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before the search
    with pytest.raises(CalibrationError, match="--cost table needs the table: pass --costs FILE"):
        select_drafts(tmp_path / "c", loaded, settings)


def test_profile_runs_with_torch_transformers_and_onnx_unavailable(profiled, tmp_path):
    script = textwrap.dedent(
        """
        import sys

        class Refuse:  # refuses (and so reveals) any import of the heavy packages
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "onnx"):
                    raise ImportError(f"{name} is refused in this test")

        sys.meta_path.insert(0, Refuse())
        from conflayers_runtime.cli import main

        sys.exit(main(["profile", sys.argv[1], "--repeats", "1", "--threads", "1", "--out", sys.argv[2]]))
        """
    )
    out = tmp_path / "c.json"
    result = subprocess.run(
        [sys.executable, "-c", script, str(profiled[0]), str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "fit error: at most" in result.stdout and read_cost_table(out).device == "cpu"
