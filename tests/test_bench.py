"""bench's engines beyond ours: onnxruntime-genai's n-gram and draft-model modes, exactness against
each engine's own plain decoding, tokens/s per task kind, and the sampled run (no timed assertions)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from conflayers_runtime import LookupConfig
from conflayers_runtime.manifest import Draft, read_manifest

from conflayers_export.bench import (
    GENAI_OUR_FULL,
    GENAI_PLAIN,
    BenchPrompt,
    Engine,
    GenaiOptions,
    load_bench_prompts,
    our_engines,
    run_bench,
    select_engines,
)
from conflayers_export.cli import main as export_main
from conflayers_export.errors import BenchError, CalibrationError, GenerationError
from conflayers_export.models import load_model
from tests.helpers import build, tiny_model, write_tiny_folder

TASKS_FILE = Path(__file__).parent.parent / "examples" / "prompts" / "tasks.jsonl"
KINDS = {
    "chat",
    "open_qa",
    "math",
    "code_writing",
    "code_explanation",
    "summarization",
    "translation",
    "story",
}
PROMPTS = [BenchPrompt("abcabcab", "repeat"), BenchPrompt("hello", "word"), BenchPrompt("xyz", "word")]
OUR_DRAFT = "onnxruntime-genai, our draft (int8)"


def test_the_task_prompt_set_has_eight_kinds_of_two_prompts_or_more():
    prompts = load_bench_prompts(TASKS_FILE)
    counts = collections.Counter(p.task for p in prompts)
    assert set(counts) == KINDS and min(counts.values()) >= 2


def test_prompts_without_a_task_are_untagged_and_chat_lists_are_refused(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("abc\nhello\n")
    assert [p.task for p in load_bench_prompts(text)] == ["untagged", "untagged"]
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(CalibrationError, match="plain text"):
        load_bench_prompts(chat)


@pytest.fixture(scope="module")
def genai_artifact(tmp_path_factory):
    """A tiny llama artifact (default draft int8, which a tiny random model accepts), and a tiny
    draft model of the same vocabulary for onnxruntime-genai's own draft-model mode."""
    root = tmp_path_factory.mktemp("bench")
    target = write_tiny_folder(tiny_model("llama")[0], root / "target-hf")
    draft = write_tiny_folder(tiny_model("llama", seed=1, num_hidden_layers=2)[0], root / "draft-hf")
    artifact = root / "artifact"
    build(artifact, load_model(str(target)), {"int8": Draft("int8", [], weight_precision="int8"), "mid": [1]})
    return artifact, draft


@pytest.fixture(scope="module")
def genai_cache(tmp_path_factory):
    """onnxruntime-genai's builds of the tiny models go to a folder of this module's (built once)."""
    pytest.importorskip("onnxruntime_genai", reason="interop extra not installed: pip install -e .[interop]")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONFLAYERS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def test_bench_runs_genai_engines_with_exactness_task_kinds_and_sampling(genai_artifact, genai_cache):
    artifact, draft_model = genai_artifact
    options = GenaiOptions(draft_model=str(draft_model))
    result = run_bench(artifact, PROMPTS, 16, 1, with_transformers=False, genai=options, sampled=True)
    engines = result["engines"]
    ngram, pair = "onnxruntime-genai n-gram", f"onnxruntime-genai, draft model ({draft_model})"
    assert {GENAI_PLAIN, ngram, GENAI_OUR_FULL, OUR_DRAFT, pair, "ours plain"} <= set(engines)
    assert result["task_kinds"] == ["repeat", "word"]
    for name, r in engines.items():
        assert set(r["by_task"]) == {"repeat", "word"}, name
    # Exact by construction: our drafts in our runtime, and our draft in onnxruntime-genai (our full
    # graph computes a row alike in one-token steps and verify passes).
    lookups = ("ours lookup", "ours speculative + lookup (int8)", "ours speculative + lookup (mid)")
    for name in ("ours speculative (int8)", "ours speculative (mid)", OUR_DRAFT, *lookups):
        assert engines[name]["exact_vs_own_plain"]["equal"] == len(PROMPTS), name
    assert engines[OUR_DRAFT]["exact_vs_own_plain"]["reference"] == GENAI_OUR_FULL
    assert engines[OUR_DRAFT]["genai_speculative_stats"]["draft_tokens_accepted"] > 0
    assert engines[OUR_DRAFT]["acceptance_rate"] > 0
    for name in (ngram, pair):  # its own modes, reported against its own plain decoding
        assert engines[name]["exact_vs_own_plain"]["reference"] == GENAI_PLAIN
        assert 0 <= engines[name]["exact_vs_own_plain"]["equal"] <= len(PROMPTS)
    assert engines[pair]["genai_speculative_stats"]["draft_tokens_evaluated"] > 0
    assert engines[ngram]["genai_speculative_stats"]["ngram_lookup_hits"] > 0  # "abcabcab" repeats itself
    assert "exact_vs_own_plain" not in engines[GENAI_PLAIN]

    sampled = result["sampled"]
    assert (sampled["temperature"], sampled["top_p"]) == (0.7, 0.9)
    assert set(sampled["engines"]) == set(engines)
    assert sampled["engines"]["ours speculative (int8)"]["acceptance_rate"] > 0
    assert sampled["engines"][OUR_DRAFT]["acceptance_rate"] > 0
    assert all("exact_vs_own_plain" not in r for r in sampled["engines"].values())


def test_bench_loads_only_the_engines_asked_for_and_their_plain_decodings(
    genai_artifact, genai_cache, monkeypatch
):
    from conflayers_export import bench

    artifact, draft_model = genai_artifact
    options = GenaiOptions(draft_model=str(draft_model))
    built = []
    monkeypatch.setattr(bench, "genai_model_folder", lambda *args: built.append(args) or args[1])
    result = run_bench(artifact, PROMPTS, 8, 1, with_transformers=False, genai=options, only=[OUR_DRAFT])
    assert set(result["engines"]) == {"ours plain", GENAI_OUR_FULL, OUR_DRAFT}
    assert built == []  # its own build of the model: not needed, not made
    result = run_bench(artifact, PROMPTS, 8, 1, with_genai=False, with_transformers=False, only=["*(mid)"])
    mid = {e.name for e in our_engines(read_manifest(artifact)) if e.name.endswith("(mid)")}
    assert "ours speculative (mid)" in mid and set(result["engines"]) == {"ours plain", *mid}


def test_a_sampled_engine_repeats_its_output_with_its_seeds(genai_artifact, genai_cache):
    """Fixed seeds: each engine samples the same tokens in every repeat (so the engines' runs are
    comparable), and differently from greedy decoding."""
    import onnxruntime_genai as og
    from conflayers_runtime import SamplingConfig

    from conflayers_export.bench import SAMPLED, _genai_runner, genai_config

    artifact, _ = genai_artifact
    run = _genai_runner(og, og.Model(genai_config(og, artifact, speculative=True)), 24, speculates=True)
    ids = [0, 1, 2, 0, 1]
    seeded = SamplingConfig(SAMPLED.temperature, SAMPLED.top_k, SAMPLED.top_p, seed=3)
    assert run(ids, seeded).tokens == run(ids, seeded).tokens
    assert run(ids, seeded).tokens != run(ids, SamplingConfig()).tokens


def test_refused_ngram_settings_fail_before_timing(genai_artifact, genai_cache):
    artifact, _ = genai_artifact
    with pytest.raises(GenerationError, match="n-gram settings"):
        run_bench(artifact, PROMPTS, 8, 1, with_transformers=False, genai=GenaiOptions({"ngram_size": 99}))


def test_cli_bench_prints_task_kinds_and_reads_genai_options(genai_artifact, genai_cache, tmp_path, capsys):
    artifact, _ = genai_artifact
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"task": p.task, "prompt": p.text}) + "\n" for p in PROMPTS))
    out = tmp_path / "bench.json"
    argv = ["bench", str(artifact), "--prompts", str(prompts), "--max-new-tokens", "8", "--repeats", "1"]
    argv += ["--no-transformers", "--genai-ngram", "none", "--genai-draft-tokens", "3", "--json", str(out)]
    assert export_main(argv) == 0
    engines = json.loads(out.read_text())["engines"]
    assert "onnxruntime-genai n-gram" not in engines and OUR_DRAFT in engines
    printed = capsys.readouterr().out
    assert "per task kind" in printed and "repeat" in printed and "exact 3/3" in printed
    assert export_main(["bench", str(artifact), "--genai-ngram", "ngram_size"]) == 2  # not KEY=VALUE


def test_our_engines_are_listed_in_one_place(genai_artifact):
    artifact, _ = genai_artifact
    engines = {e.name: e for e in our_engines(read_manifest(artifact))}
    assert engines["ours plain"].load_kwargs == {"draft": None}
    assert (
        engines["ours speculative (int8)"].mode == "speculative"
        and engines["ours speculative (int8)"].pass_costs
    )
    assert engines["ours auto (load defaults)"].load_kwargs == {"draft": "int8"}  # recommended by default
    # A draft's own engine loads without the lookup (load() would add a calibrated one), and the
    # lookup runs alone and beside each draft.
    assert engines["ours speculative (int8)"].load_kwargs == {"draft": "int8", "lookup": False}
    assert engines["ours lookup"].load_kwargs == {"draft": None, "lookup": LookupConfig()}
    assert engines["ours speculative + lookup (mid)"].load_kwargs == {
        "draft": "mid",
        "lookup": LookupConfig(),
    }


def test_engine_patterns_keep_the_plain_decodings_their_ratios_need():
    def run(ids, sampling):
        raise AssertionError("not run")

    engines = {
        "ours plain": Engine(run),
        "ours speculative (int8)": Engine(run, reference="ours plain"),
        "ours lookup": Engine(run, reference="ours plain"),
        GENAI_PLAIN: Engine(run),
        "onnxruntime-genai n-gram": Engine(run, reference=GENAI_PLAIN),
        GENAI_OUR_FULL: Engine(run),
        OUR_DRAFT: Engine(run, reference=GENAI_OUR_FULL),
    }
    assert select_engines(engines, ()) is engines
    kept = select_engines(engines, ["ours spec*", "*n-gram"])
    assert list(kept) == ["ours plain", "ours speculative (int8)", GENAI_PLAIN, "onnxruntime-genai n-gram"]
    assert list(select_engines(engines, [OUR_DRAFT])) == ["ours plain", GENAI_OUR_FULL, OUR_DRAFT]
    with pytest.raises(BenchError, match="no engine matches 'ours tree\\*'.*ours lookup"):
        select_engines(engines, ["ours plain", "ours tree*"])
