"""Lookup drafting (runtime lookup.py): proposals read from the text itself, alone or with the
model draft in one verify pass. Exact like every draft: greedy output is plain decoding's token
for token; sampled output is distributed as the full model's (a looked-up proposal is a one-hot
draft distribution)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest
from conflayers_runtime import (
    DraftConfig,
    GenerationError,
    GenerationStats,
    Lookup,
    LookupConfig,
    ManifestError,
    SamplingConfig,
    Task,
    TreeConfig,
    load,
    speculative,
)
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.lookup import TextLookup
from conflayers_runtime.manifest import read_manifest, write_manifest
from conflayers_runtime.speculative import generate

from tests.test_reference import chi_square_p_value
from tests.test_sampling_cycles import PROMPT, SAMPLES, VOCAB, MarkovBackend, exact_joint

# --- the lookup itself ---------------------------------------------------------------------------


def test_the_latest_earlier_match_of_the_longest_ngram_proposes_what_followed_it():
    text = TextLookup(LookupConfig(min_ngram=1, max_ngram=3, max_draft_tokens=4), [5, 6, 7, 8, 1, 6, 7, 9, 2])
    assert text.propose([6, 7], 4) == [9, 2]  # "6 7" last followed by 9 (at 5..7), not by 8
    assert text.propose([5, 6, 7], 2) == [8, 1]  # the 3-gram "5 6 7" wins over the later "6 7"
    assert text.propose([], 3) == []  # "...7 9 2": 2 never occurred before
    assert text.propose([3], 4) == []
    assert text.propose([6], 1) == [7]


def test_a_short_continuation_chains_into_the_next_match():
    text = TextLookup(LookupConfig(min_ngram=1, max_ngram=1, max_draft_tokens=8), [1, 2, 3, 1])
    # "1" was followed by 2 (chaining: then "2" by 3, "3" by 1, "1" by 2...): a repeated cycle.
    assert text.propose([], 7) == [2, 3, 1, 2, 3, 1, 2]


def test_only_decided_tokens_are_matched_and_min_ngram_is_respected():
    text = TextLookup(LookupConfig(min_ngram=2, max_ngram=2, max_draft_tokens=4), [4, 5, 6])
    assert text.propose([9, 4, 5], 2) == [6]  # proposals extend the key, never the continuation
    assert text.propose([5], 2) == []  # "6 5" never occurred
    text.extend([4, 5])
    assert text.propose([], 3) == [6, 4, 5]  # "4 5" followed by 6, then "5 6" by 4, "6 4" by 5


@pytest.mark.parametrize(
    "config", [dict(min_ngram=0), dict(min_ngram=3, max_ngram=2), dict(max_draft_tokens=0)]
)
def test_a_bad_lookup_config_is_refused(config):
    with pytest.raises(GenerationError, match="lookup needs"):
        LookupConfig(**config)


# --- greedy: the same tokens as plain decoding, on every architecture ----------------------------


def _looping_prompt(seed: int) -> list[int]:
    """A prompt that repeats a span, so that lookups match in the prompt as well as in the text."""
    span = [int(t) for t in np.random.default_rng(seed).integers(3, 200, 7)]
    return [*span, 9, 12, *span[:4]]


@pytest.mark.parametrize("draft", [None, "skip", "int8", "pruned"])
def test_greedy_lookup_alone_and_with_each_draft_equals_plain_decoding(draft_kinds_artifact, draft):
    folder, manifest = draft_kinds_artifact
    plain_backend = open_backend(folder, manifest, None, "cpu", 1)
    backend = open_backend(folder, manifest, draft, "cpu", 1)
    config = DraftConfig(4, 0.0) if draft else None
    total = GenerationStats()
    for seed in range(3):
        prompt = _looping_prompt(seed)
        plain, _ = generate(plain_backend, prompt, 48, draft_config=None)
        tokens, stats = generate(backend, prompt, 48, draft_config=config, lookup=LookupConfig(1, 3, 6))
        assert tokens == plain, f"seed {seed}"
        total.merge(stats)
    if draft is None:  # the text's proposals alone, accepted
        assert total.draft_passes == 0 and total.looked_up_accepted > 0
    else:  # draft passes read the text's guesses beside the token they draft from
        assert total.draft_rows > total.draft_passes > 0


def test_greedy_lookup_with_trees_equals_plain_decoding(draft_kinds_artifact):
    folder, manifest = draft_kinds_artifact
    plain_backend = open_backend(folder, manifest, None, "cpu", 1)
    backend = open_backend(folder, manifest, "skip", "cpu", 1, tree=True)
    prompt = _looping_prompt(7)
    plain, _ = generate(plain_backend, prompt, 48, draft_config=None)
    tokens, stats = generate(
        backend, prompt, 48, draft_config=DraftConfig(4, 0.0), tree=TreeConfig(2, 2), lookup=LookupConfig()
    )
    assert tokens == plain and stats.tree_nodes > 0


# --- sampling: distributed as the full model over whole cycles ----------------------------------

NEW_TOKENS = 5


def sampled_joint(backend, draft: DraftConfig | None, lookup: LookupConfig) -> tuple[np.ndarray, int]:
    counts = np.zeros((VOCAB,) * NEW_TOKENS)
    looked_up = 0
    for seed in range(SAMPLES):
        config = SamplingConfig(temperature=1.0, seed=seed)
        tokens, stats = generate(backend, PROMPT, NEW_TOKENS, config, draft, lookup=lookup)
        counts[tuple(tokens)] += 1
        looked_up += stats.looked_up_tokens
    return counts, looked_up


LOOKUP = LookupConfig(min_ngram=1, max_ngram=2, max_draft_tokens=3)
SOURCES = {"lookup": None, "both": DraftConfig(max_draft_tokens=3, confidence_threshold=0.5)}


@pytest.fixture(scope="module")
def chain():
    backend = MarkovBackend()
    return backend, exact_joint(backend)


@pytest.mark.parametrize("source", SOURCES)
def test_sampled_lookup_cycles_are_distributed_as_the_full_model(chain, source):
    backend, expected = chain
    counts, looked_up = sampled_joint(backend, SOURCES[source], LOOKUP)
    # The lookup proposed in most generations; beside the draft, the draft's samples confirmed
    # its guesses often (the rows after a confirmed guess were used).
    assert looked_up > (SAMPLES if source == "lookup" else SAMPLES // 10)
    assert chi_square_p_value(counts, expected) > 1e-3


def test_a_looked_up_token_checked_as_if_drawn_from_the_draft_fails(chain, monkeypatch):
    """Wrong: a looked-up proposal is deterministic, but is verified against a spread distribution
    (uniform) instead of its one-hot one: the acceptance rule then keeps it too often."""
    backend, expected = chain
    one_hot = speculative._Proposal.distributions

    def spread(self, token_ids, vocab_size):
        q = one_hot(self, token_ids, vocab_size)
        if self.looked_up:
            q[len(q) - self.looked_up :] = 1.0 / vocab_size
        return q

    monkeypatch.setattr(speculative._Proposal, "distributions", spread)
    counts, _ = sampled_joint(backend, None, LOOKUP)
    assert chi_square_p_value(counts, expected) < 1e-6


def test_a_guess_taken_as_the_drafts_own_sample_fails(chain, monkeypatch):
    """Wrong: beside the draft, the text's guess is proposed as if the draft had sampled it (its
    row's distribution as q) instead of only where the draft's own sample equals it."""
    backend, expected = chain
    draft_rows = speculative._draft_rows

    def always_agree(backend, feed, position, count, sampling_config, rng, tree):
        rows = draft_rows(backend, feed, position, count, sampling_config, rng, tree)
        guess = feed[len(feed) - count + 1 :]
        return [dataclasses.replace(r, token=g) for r, g in zip(rows, guess, strict=False)] + rows[
            len(guess) :
        ]

    monkeypatch.setattr(speculative, "_draft_rows", always_agree)
    counts, _ = sampled_joint(backend, SOURCES["both"], LOOKUP)
    assert chi_square_p_value(counts, expected) < 1e-6


# --- the manifest and load() ---------------------------------------------------------------------


def test_a_task_records_its_source_and_load_decodes_with_the_calibrated_lookup(
    draft_kinds_artifact, tmp_path
):
    shared, _ = draft_kinds_artifact
    folder = tmp_path / "a"
    shutil.copytree(shared, folder)  # the shared artifact stays as built
    manifest = read_manifest(folder)
    prompt = _looping_prompt(3)
    plain = load(folder, draft=None).generate(prompt, 40, mode="plain").token_ids
    assert Task(None).source == "none" and Task("skip").source == "model"
    manifest.tasks["default"] = Task(None, "", Lookup(1, 3, 6), {"expected_speedup": 1.4})
    assert manifest.tasks["default"].source == "lookup"
    write_manifest(manifest, folder)
    model = load(folder)
    assert model.draft is None and model.lookup == LookupConfig(1, 3, 6)
    result = model.generate(prompt, 40, guard=False)
    assert result.mode == "speculative" and result.token_ids == plain
    assert model.last_stats.looked_up_tokens > 0 and model.last_stats.draft_passes == 0
    assert load(folder, lookup=False).generate(prompt, 40).mode == "plain"
    # Both: the default task's draft opens beside its lookup.
    manifest.tasks["default"] = Task("skip", "", Lookup(2, 3, 8))
    assert manifest.tasks["default"].source == "both"
    write_manifest(manifest, folder)
    model = load(folder)
    assert model.draft == "skip" and model.generate(prompt, 40, guard=False).token_ids == plain
    assert model.last_stats.draft_passes > 0


def test_a_lookup_task_round_trips_and_a_bad_one_is_refused(draft_kinds_artifact, tmp_path):
    manifest = copy.deepcopy(draft_kinds_artifact[1])
    manifest.tasks["summaries"] = Task(None, "lookup", Lookup(2, 4, 8), {"acceptance_rate": 0.5})
    write_manifest(manifest, tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["tasks"]["summaries"]["lookup"] == {"min_ngram": 2, "max_ngram": 4, "max_draft_tokens": 8}
    assert "lookup" not in data["tasks"].get("default", {})  # absent where there is none, as in 1.4
    assert read_manifest(tmp_path).tasks["summaries"] == manifest.tasks["summaries"]
    data["tasks"]["summaries"]["lookup"]["min_ngram"] = 5
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="task 'summaries': lookup needs 1 <= min_ngram <= max_ngram"):
        read_manifest(tmp_path)


def test_speculative_mode_needs_a_draft_or_a_lookup(draft_kinds_artifact):
    folder, _ = draft_kinds_artifact
    with pytest.raises(GenerationError, match="needs a draft or a lookup"):
        load(folder, draft=None, lookup=False).generate([5, 6], 4, mode="speculative")
    assert (
        load(folder, draft=None, lookup=True).generate([5, 6, 5], 4, mode="speculative").mode == "speculative"
    )


def test_generate_with_a_lookup_from_both_command_lines(draft_kinds_artifact, capsys):
    from conflayers_runtime.cli import main as run_main

    from conflayers_export.cli import main as export_main

    folder, _ = draft_kinds_artifact
    common = [str(folder), "--prompt", "a b c d e f a b c d", "--no-chat", "--max-new-tokens", "24", "--json"]
    results = {}
    for name, argv in [
        ("plain", ["generate", *common, "--mode", "plain"]),
        (
            "export lookup",
            ["generate", *common, "--mode", "speculative", "--lookup", "on", "--draft", "skip"],
        ),
        ("run lookup", [*common, "--mode", "speculative", "--lookup", "on", "--draft", "int8"]),
        ("run off", [*common, "--mode", "speculative", "--lookup", "off", "--draft", "int8"]),
    ]:
        runner = export_main if argv[0] == "generate" else run_main
        assert runner(argv) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["export lookup"]["lookup"] and results["run lookup"]["lookup"]
    assert results["run off"]["looked_up"]["proposed"] == 0
    assert not results["run off"]["lookup"] and not results["plain"]["lookup"]
    assert len({r["text"] for r in results.values()}) == 1  # the same greedy text


# --- calibrate scores the lookup alone and beside the draft, and ships the best -----------------


def _lookup_table(loaded, extra_row_cost: float):
    """A cost table (tests/test_costs.py) where a draft pass costs 3 steps (no model draft pays) and
    a verify pass 1 + extra_row_cost per row beyond the first."""
    from conflayers_runtime.costs import LinearCost

    from tests.test_costs import _table

    table = _table(
        {p: LinearCost(3.0, 0.0, 0.0) for p in ("base", "int8", "int4")}, loaded.identity.fingerprint
    )
    return dataclasses.replace(table, verify={r: 1 + extra_row_cost * (r - 1) for r in range(2, 17)})


def test_calibrate_scores_lookups_and_ships_one_only_where_it_wins(tiny_folder, tmp_path):
    from conflayers_export.calibrate import search_layers, select_drafts
    from conflayers_export.export.build import build_artifact, manifest_for_build
    from conflayers_export.models import load_model
    from tests.test_calibrate import SMALL

    loaded = load_model(str(tiny_folder("llama")))
    prompts = ["a b c d e f g a b c d e", "h i j h i j h i", "k l m n k l", "o p q r s o p"]
    settings = dataclasses.replace(SMALL, cost="table", max_new_tokens=48, lookups=((1, 3, 6), (2, 3, 8)))
    search_layers(tmp_path / "c", loaded, {"default": prompts}, settings)
    # Rows cost nothing: any accepted lookup token pays, and the draft, 3 steps a pass, does not.
    manifest, results = select_drafts(tmp_path / "c", loaded, settings, costs=_lookup_table(loaded, 0.0))
    joint = results[0].drafts
    assert {(c.source, c.min_ngram, c.max_draft_tokens) for c in joint.sources} == {
        (source, n, k) for source in ("lookup", "both") for n, k in ((1, 6), (2, 8))
    }
    for c in joint.sources:
        assert c.rows_per_full_pass > 1 and c.c_verify == 1.0
        assert (c.c_draft == 0) == (c.source == "lookup") == (c.draft_passes_per_cycle == 0)
    best = max(joint.sources, key=lambda c: c.expected_speedup)
    assert best.source == "lookup" and best.lookup_share == 1.0 and best.mean_tokens_per_cycle > 1
    assert joint.chosen.expected_speedup < 1 < best.expected_speedup
    assert joint.source is best and joint.confirmation.matches_replay  # the real run counted the replay's
    task = manifest.tasks["default"]
    assert task.lookup == Lookup(best.min_ngram, best.max_ngram, best.max_draft_tokens)
    assert task.source == "lookup" and task.metrics["expected_speedup"] == best.expected_speedup
    assert "**(ships)**" in (tmp_path / "c" / "calibration" / "report.md").read_text()

    # Built and loaded, the artifact decodes with the shipped lookup alone, as plain decoding does.
    build_artifact(tmp_path / "c", loaded, manifest_for_build(tmp_path / "c", loaded), max_seq_len=96)
    model = load(tmp_path / "c")
    assert model.draft is None and model.lookup == best.config
    ids = loaded.encode(prompts[0])
    plain = load(tmp_path / "c", lookup=False).generate(ids, 40, mode="plain").token_ids
    assert model.generate(ids, 40, guard=False).token_ids == plain

    # Control: where each extra row of a full pass costs a whole step, the verify pass costs as much
    # as the plain steps it could replace: no lookup pays, and none ships.
    manifest, results = select_drafts(tmp_path / "c", loaded, settings, costs=_lookup_table(loaded, 1.0))
    assert all(c.expected_speedup <= 1 for c in results[0].drafts.sources)
    assert results[0].drafts.source is None and manifest.tasks["default"].lookup is None
