"""Scoring by replay (calibrate/replay.py) counts what a real speculative run counts, and the
robust pass-cost timing ignores what a busy machine adds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conflayers_runtime import DraftConfig, GenerationStats, TreeConfig
from conflayers_runtime import speculative as speculative_module
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.manifest import Draft, read_manifest
from conflayers_runtime.speculative import GREEDY, generate, measure_pass_costs

from conflayers_export.calibrate.replay import KnownCaches, ReplayBackend, replay_generation
from conflayers_export.calibrate.scoring import TIMING_MARGIN, timed_costs
from conflayers_export.models import load_model
from tests.helpers import build

NEW_TOKENS = 40
CONFIGS = [DraftConfig(8, 0.8), DraftConfig(12, 0.0), DraftConfig(3, 0.3)]


@pytest.fixture(scope="module")
def artifact(tiny_folder, tmp_path_factory):
    """A tiny llama with a layer-skip, an int8 and a pruned int4 draft; prompts and their texts."""
    loaded = load_model(str(tiny_folder("llama")))
    folder = tmp_path_factory.mktemp("replay") / "a"
    drafts = {
        "mid": [1, 2],
        "int8": Draft("int8", [], weight_precision="int8"),
        "pruned": Draft("pruned", [2], vocab_size=96, weight_precision="int4"),
    }
    build(folder, loaded, drafts, max_seq_len=128, ranked=range(256))
    manifest = read_manifest(folder)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 200, 9)] for _ in range(4)]
    plain = open_backend(folder, manifest, None, "cpu", 1)
    texts, known = [], []
    for prompt in prompts:  # as calibrate generates them: each text's keys and values kept
        texts.append(generate(plain, prompt, NEW_TOKENS, GREEDY, None)[0])
        known.append(KnownCaches(plain, len(prompt) + NEW_TOKENS - 1))
    return folder, manifest, prompts, texts, known


def _real(backend, prompts, config, stops, tree=None) -> GenerationStats:
    total = GenerationStats()
    for prompt in prompts:
        total.merge(generate(backend, prompt, NEW_TOKENS, GREEDY, config, stops, tree)[1])
    return total


@pytest.mark.parametrize("known", [False, True], ids=["prefill", "known-caches"])
@pytest.mark.parametrize("on_device", [True, False], ids=["device-choice", "logits"])
@pytest.mark.parametrize("name", ["mid", "int8", "pruned"])
def test_replay_counts_exactly_what_a_real_run_counts(artifact, name, on_device, known):
    """Also when each replay starts from the keys and values the plain decoding of its text kept
    (another session, of full.onnx alone; "mid" runs paired) instead of its own prefill."""
    folder, manifest, prompts, texts, caches = artifact
    backend = open_backend(folder, manifest, name, "cpu", 1)
    backend.chooses_on_device = on_device  # both of the loop's greedy paths
    # Stop tokens taken from the texts, so that generations end early and cycles look past them.
    for config, stops in itertools.product(CONFIGS, [(), (texts[0][10], texts[1][5])]):
        real = _real(backend, prompts, config, stops)
        replayed = replay_generation(
            backend, prompts, texts, NEW_TOKENS, config, stops, known=caches if known else None
        )
        assert replayed.as_dict() == real.as_dict(), (config, stops)
        assert real.verify_passes > 0 and real.drafted_tokens > 0


@pytest.mark.parametrize("name", ["mid", "int8"])
def test_known_caches_are_bitwise_what_a_prefill_computes(artifact, name):
    folder, manifest, prompts, texts, caches = artifact
    backend = open_backend(folder, manifest, name, "cpu", 1)
    for prompt, text, known in zip(prompts, texts, caches, strict=True):
        computed = ReplayBackend(backend, prompt, text)
        computed.greedy(prompt, 0, use_draft=False)
        copied = ReplayBackend(backend, prompt, text, known)
        copied.greedy(prompt, 0, use_draft=False)
        length = len(prompt) + len(text) - 1
        assert computed.saved.keys() == copied.saved.keys()
        for key, values in computed.saved.items():
            np.testing.assert_array_equal(copied.saved[key][:, :, :length], values[:, :, :length])
            assert np.any(values[:, :, :length])


def test_known_caches_of_another_length_are_refused(artifact):
    folder, manifest, prompts, texts, caches = artifact
    backend = open_backend(folder, manifest, "mid", "cpu", 1)
    with pytest.raises(ValueError, match="known keys and values of"):
        replay_generation(backend, prompts[:1], [texts[0][:20]], 20, CONFIGS[0], (), known=caches[:1])


@pytest.mark.parametrize("name", ["mid", "int8", "pruned"])
def test_replay_with_token_trees_counts_what_a_real_run_counts(artifact, name):
    """An alternative equal to the text's token predicts the text's next token: what its row's
    argmax gives (but at near-ties, which these random models do not have)."""
    folder, manifest, prompts, texts, caches = artifact
    backend = open_backend(folder, manifest, name, "cpu", 1, tree=True)
    hits = 0
    for config, tree in itertools.product(CONFIGS, [TreeConfig(1, 1), TreeConfig(4, 2)]):
        real = _real(backend, prompts, config, (), tree)
        replayed = replay_generation(backend, prompts, texts, NEW_TOKENS, config, (), tree, known=caches)
        assert replayed.as_dict() == real.as_dict(), (config, tree)
        assert real.tree_nodes > 0
        hits += real.tree_hits
    assert hits > 0, "proposals carried from the trees' rows must be replayed too"


def test_replay_needs_the_full_models_keys_and_values_back(artifact, monkeypatch):
    """Control: left in place, a draft's keys and values at accepted positions change what it drafts
    next, and the replay no longer counts what a real run counts."""
    folder, manifest, prompts, texts, _ = artifact
    backend = open_backend(folder, manifest, "mid", "cpu", 1)
    config = DraftConfig(12, 0.0)
    real = _real(backend, prompts, config, ())
    monkeypatch.setattr(ReplayBackend, "_restore", lambda self, start, stop: None)
    assert replay_generation(backend, prompts, texts, NEW_TOKENS, config, ()).as_dict() != real.as_dict()


def test_replay_refuses_a_text_of_another_prompt(artifact):
    folder, manifest, prompts, texts, _ = artifact
    backend = open_backend(folder, manifest, "int8", "cpu", 1)
    with pytest.raises(ValueError, match="not the full model's greedy continuation of its prompt"):
        replay_generation(backend, prompts[:1], texts[1:2], NEW_TOKENS, CONFIGS[0], ())
    with pytest.raises(ValueError, match="leaves the replayed text"):
        replay_generation(backend, prompts[:1], [texts[0][:5]], NEW_TOKENS, CONFIGS[0], ())


class _Clock:
    """A fake perf_counter that a fake backend advances by each pass's cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _TimedBackend:
    """Steps cost 1.0, draft passes ``draft_cost``, verify passes 1.2; ``spikes`` add to some calls
    (another process taking the cores for a while)."""

    def __init__(self, clock: _Clock, draft_cost: float, spikes: dict[int, float]):
        self.clock, self.draft_cost, self.spikes, self.calls = clock, draft_cost, spikes, 0

    def forward(self, token_ids, start, use_draft):
        cost = self.draft_cost if use_draft else (1.0 if len(token_ids) == 1 else 1.2)
        self.clock.now += cost + self.spikes.get(self.calls, 0.0)
        self.calls += 1
        return np.zeros((len(token_ids), 8), np.float32)


def test_pass_costs_take_the_fastest_interleaved_repeats(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(speculative_module.time, "perf_counter", clock)
    # Busy stretches that slow every pass they hit by 50-300%: the costs stay exact.
    spikes = {n: 3.0 for n in range(5, 14)} | {20: 1.5, 31: 0.5}
    c_draft, c_verify = measure_pass_costs(_TimedBackend(clock, 0.4, spikes), repeats=9, verify_tokens=3)
    assert (c_draft, c_verify) == (pytest.approx(0.4), pytest.approx(1.2))
    # A median of separate runs, as timed before, would have moved with the load:
    assert (0.4 + 3.0) / 1.0 > 0.4 * TIMING_MARGIN


def test_timings_far_from_the_bytes_ratio_are_retimed_and_flagged(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(speculative_module.time, "perf_counter", clock)
    c_draft, c_verify, flag = timed_costs(_TimedBackend(clock, 0.4, {}), bytes_ratio=0.35, verify_tokens=3)
    assert c_draft == pytest.approx(0.4) and c_verify == pytest.approx(1.2) and flag == ""
    c_draft, _, flag = timed_costs(_TimedBackend(clock, 0.9, {}), bytes_ratio=0.3, verify_tokens=3)
    assert c_draft == pytest.approx(0.9)
    assert "timed c_draft 0.90, re-timed 0.90: 3.00x its bytes ratio 0.30" in flag
    calls = _TimedBackend(clock, 0.9, {})
    c_draft, _, flag = timed_costs(calls, bytes_ratio=0.3, verify_tokens=3, retime=False)
    assert c_draft == pytest.approx(0.9) and "not re-timed" in flag
    assert calls.calls == 4 + 3 * 9  # prefill, warm-up and 9 repeats of 3 passes: no second timing
