"""The ONNX Runtime decoder: exact greedy output, exact sampling distribution, the user API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conflayers_runtime import (
    DeviceError,
    GenerationError,
    SpeedGuard,
    Task,
    load,
    read_manifest,
    sampling,
    write_manifest,
)
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.cli import main as run_main

from conflayers_export.cli import main as export_main
from conflayers_export.models import load_model
from conflayers_export.models.reference import speculative_generate
from tests.helpers import build
from tests.test_reference import (
    SAMPLES,
    VOCAB,
    always_accept,
    chi_square_p_value,
    exact_first_two,
    speculative_first_two,
)

PROMPTS = [
    "Write a short poem about the sea.",
    "What is 17 times 23? Explain step by step.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Write a Python function that reverses a string.",
]


@pytest.fixture(scope="module")
def smol_artifact(smollm2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smol") / "artifact"
    # "mid3" is accepted often; "every-other" (12 layers) is rejected often and exercises rollback.
    build(folder, smollm2, {"mid3": [14, 15, 16], "every-other": list(range(3, 27, 2))}, max_seq_len=256)
    return folder


@pytest.mark.real_model
@pytest.mark.parametrize("draft", ["mid3", "every-other"])
def test_smollm2_speculative_equals_plain_and_pytorch(smollm2, smol_artifact, draft):
    model = load(smol_artifact, draft=draft)
    rejected = 0
    for prompt in PROMPTS:
        ids = model.encode(prompt)
        assert ids == smollm2.encode(prompt), "the runtime's chat formatting must match transformers'"
        reference, _ = speculative_generate(
            smollm2.model,
            smollm2.architecture,
            ids,
            [],
            64,
            draft_config=None,
            stop_token_ids=smollm2.stop_token_ids,
        )
        speculative = model.generate(ids, 64, mode="speculative")
        plain = model.generate(ids, 64, mode="plain")
        assert speculative.token_ids == plain.token_ids == reference
        # the streamed text pieces add up to the decoded tokens (incremental detokenization)
        assert speculative.text == model.tokenizer.decode(speculative.token_ids, skip_special_tokens=True)
        rejected += speculative.stats.drafted_tokens - speculative.stats.accepted_tokens
    assert rejected > 0


@pytest.fixture(scope="module")
def sampling_artifact(tiny_folder, tmp_path_factory):
    folder = tiny_folder("llama", seed=3, vocab_size=VOCAB)
    loaded = load_model(str(folder))
    artifact = tmp_path_factory.mktemp("sampling") / "artifact"
    build(artifact, loaded, {"mid": [1, 2]})
    return loaded, artifact


def test_onnx_speculative_sampling_matches_plain_sampling(sampling_artifact):
    loaded, artifact = sampling_artifact
    backend = open_backend(artifact, read_manifest(artifact), "mid")
    prompt = [1, 2, 3, 4]
    counts = speculative_first_two(backend, prompt, SAMPLES)
    assert chi_square_p_value(counts, exact_first_two(loaded.model, prompt)) > 1e-3


def test_onnx_sampling_with_a_wrong_rule_fails(sampling_artifact, monkeypatch):
    loaded, artifact = sampling_artifact
    backend = open_backend(artifact, read_manifest(artifact), "mid")
    monkeypatch.setattr(sampling, "accept_sampled", always_accept)
    prompt = [1, 2, 3, 4]
    counts = speculative_first_two(backend, prompt, SAMPLES)
    assert chi_square_p_value(counts, exact_first_two(loaded.model, prompt)) < 1e-6


@pytest.fixture(scope="module")
def tiny_artifact(tiny_folder, tmp_path_factory):
    artifact = tmp_path_factory.mktemp("tiny") / "artifact"
    build(artifact, load_model(str(tiny_folder("qwen2"))), {"mid": [1, 2]})
    return artifact


def test_stream_pieces_make_the_generated_text(tiny_artifact):
    model = load(tiny_artifact)
    pieces = list(model.stream("abc", 20, chat=False, mode="speculative"))
    result = model.generate("abc", 20, chat=False, mode="speculative")
    assert "".join(pieces) == result.text and len(result.token_ids) == 20
    assert result.text == model.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_stop_strings_cut_the_text(tiny_artifact):
    model = load(tiny_artifact)
    full = model.generate("abc", 20, chat=False, mode="plain").text
    stop = full[5:7]
    cut = model.generate("abc", 20, chat=False, mode="plain", stop_strings=[stop]).text
    assert cut == full[: full.index(stop)]


def test_a_stop_string_across_two_pieces_is_cut_where_it_begins(tiny_artifact):
    model = load(tiny_artifact)
    pieces = [p for p in model.stream("abc", 20, chat=False, mode="plain") if p]
    # The last character of one piece and the first of the next, found nowhere earlier: today's
    # code must not have yielded its first character before the next piece showed the rest.
    at = next(i for i in range(1, len(pieces)) if pieces[i - 1][-1] + pieces[i][0] not in "".join(pieces[:i]))
    stop, full = pieces[at - 1][-1] + pieces[at][0], "".join(pieces)
    assert full.index(stop) == len("".join(pieces[:at])) - 1
    streamed = list(model.stream("abc", 20, chat=False, mode="plain", stop_strings=[stop]))
    assert "".join(streamed) == full[: full.index(stop)]
    # A held-back start that no stop string completes is yielded after all.
    assert "".join(model.stream("abc", 20, chat=False, mode="plain", stop_strings=[stop + "\0"])) == full


def test_a_chunk_of_no_text_keeps_the_left_context(tiny_artifact):
    """The unknown token <26> is special: skipped, it decodes to nothing; the next chunk's text must
    still be spaced as the whole sequence decodes (no context would lose the space)."""
    from conflayers_runtime.model import _Detokenizer

    tokenizer = load(tiny_artifact).tokenizer
    detokenizer = _Detokenizer(tokenizer, [])
    pieces = [detokenizer.add(chunk) for chunk in ([40, 41], [26], [42])]
    assert "".join(pieces) == tokenizer.decode([40, 41, 26, 42], skip_special_tokens=True) == "<40> <41> <42>"


def test_a_prompt_that_is_not_utf8_is_a_clear_error(tiny_artifact):
    # Bytes 0xFF 0xFE on a command line reach Python as surrogate escapes.
    with pytest.raises(GenerationError, match="not valid UTF-8 text.*position 1"):
        load(tiny_artifact).generate("a\udcff\udcfe", 4)
    result = subprocess.run(
        [sys.executable, "-m", "conflayers_runtime.cli", str(tiny_artifact), "--prompt", b"\xff\xfe"],
        capture_output=True,
    )
    assert result.returncode == 1
    assert result.stderr.decode().startswith("error: the prompt is not valid UTF-8 text")


def test_too_long_prompt_names_the_limit_and_the_fix(tiny_artifact):
    model = load(tiny_artifact)
    with pytest.raises(GenerationError, match=r"exceeds the artifact's max_seq_len 64.*--max-seq-len"):
        model.generate("a" * 60, 10, chat=False)


def test_auto_mode_follows_the_manifest(tiny_artifact, tmp_path):
    assert load(tiny_artifact).resolve_mode("auto") == "speculative"
    manifest = read_manifest(tiny_artifact)
    manifest.drafts[0].recommended = False
    manifest.tasks = {"default": Task("mid", "speculation not recommended")}
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in tiny_artifact.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    write_manifest(manifest, copy)
    # The default draft is not recommended: load() opens no draft session, auto decodes plainly.
    assert load(copy, verify=False).draft is None
    forced = load(copy, draft="mid", verify=False)  # naming it still loads it
    assert forced.draft == "mid" and forced.resolve_mode("auto") == "plain"
    assert forced.resolve_mode("speculative") == "speculative"
    with pytest.raises(GenerationError, match="needs a draft"):
        load(copy, draft=None, verify=False).resolve_mode("speculative")


def test_cuda_without_the_gpu_build_is_a_clear_error(tiny_artifact):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(DeviceError, match="needs CUDAExecutionProvider.*onnxruntime-gpu"):
        load(tiny_artifact, device="cuda")


def test_speed_guard_falls_back_and_probes_again():
    guard = SpeedGuard(warmup=2, probe_every=4, judge_after=1)  # judged after every cycle
    assert [guard.allow_draft() for _ in range(1)] == [False]
    guard.record(False, 1, 0.010)
    guard.record(False, 1, 0.010)
    assert guard.allow_draft()
    guard.record(True, 2, 0.030)  # 15 ms per token: slower than plain's 10
    assert [guard.allow_draft() for _ in range(5)] == [False, False, False, False, True]
    guard.record(True, 2, 0.030)  # loses again: waits twice as long
    assert [guard.allow_draft() for _ in range(9)] == [False] * 8 + [True]
    guard.record(True, 8, 0.008)  # 1 ms per token: beats plain, keep drafting
    assert guard.speculative < guard.plain
    assert [guard.allow_draft() for _ in range(3)] == [True] * 3
    assert guard.wait == 4 and guard.switches == 2


def test_speed_guard_judges_several_cycles_together():
    """One unlucky cycle (a draft rejected at once) does not turn a paying draft off; cycles that
    lose together do."""
    guard = SpeedGuard(warmup=1, probe_every=4, judge_after=4)
    guard.record(False, 1, 0.010)  # plain: 10 ms per token
    for tokens, seconds in [(1, 0.016), (5, 0.025), (6, 0.028), (4, 0.022)]:  # 91 ms for 16 tokens
        assert guard.allow_draft()
        guard.record(True, tokens, seconds)
    assert guard.switches == 0 and guard.speculative == pytest.approx(0.091 / 16)
    for _ in range(4):  # 16 ms per token, four times
        assert guard.allow_draft()
        guard.record(True, 1, 0.016)
    assert guard.switches == 1 and not guard.allow_draft()


def test_conflayers_run_and_export_generate(tiny_artifact, capsys):
    assert (
        run_main([str(tiny_artifact), "--prompt", "abc", "--no-chat", "--max-new-tokens", "8", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["new_tokens"] == 8 and result["mode"] == "speculative"
    argv = [
        "generate",
        str(tiny_artifact),
        "--prompt",
        "abc",
        "--no-chat",
        "--max-new-tokens",
        "8",
        "--mode",
        "plain",
    ]
    assert export_main(argv) == 0
    captured = capsys.readouterr()
    assert "[plain] 8 tokens" in captured.err
    assert run_main([str(tiny_artifact / "nope"), "--prompt", "x"]) == 1
    assert "no manifest.json" in capsys.readouterr().err


def test_runtime_loads_and_generates_without_torch(tiny_artifact):
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("torch", "transformers", "onnx"):
            sys.modules[name] = None  # importing them now raises ImportError
        import conflayers_runtime as rt
        model = rt.load({str(tiny_artifact)!r})
        print(len(model.generate("abc", 12, chat=False).token_ids))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "12"


@pytest.mark.real_model
def test_the_pair_shares_weights_in_memory(smol_artifact):
    """By default (one session over the paired graph) a layer-skip draft adds almost no memory to
    the full graph's (a loose bound; docs/BENCHMARKS.md records the figures of every mode)."""
    if not os.path.exists("/proc/self/smaps_rollup"):
        pytest.skip("needs Linux /proc (PSS)")
    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    from bench_memory import measure

    full = measure(str(smol_artifact), None, "prepacked")[0]
    pair = measure(str(smol_artifact), "mid3", "paired")[0]
    assert pair <= 1.2 * full, (full, pair)


def test_bench_reports_every_engine_with_its_ratios(tiny_artifact, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("abc\nhello\n")
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        str(tiny_artifact),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        "6",
        "--repeats",
        "1",
        "--no-genai",
        "--json",
        str(out),
    ]
    assert export_main(argv) == 0
    result = json.loads(out.read_text())
    engines = result["engines"]
    assert set(engines) >= {
        "ours plain",
        "ours speculative (mid)",
        "ours auto (mid)",
        "transformers generate",
    }
    spec = engines["ours speculative (mid)"]
    assert spec["measured_speedup"] == pytest.approx(
        spec["decode_tokens_per_s"]["median"] / engines["ours plain"]["decode_tokens_per_s"]["median"]
    )
    assert spec["c_draft_measured"] > 0 and spec["analytic_speedup"] > 0
    assert "ours plain" in capsys.readouterr().out
