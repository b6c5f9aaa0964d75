"""``bench``: our plain and speculative decoding against transformers and onnxruntime-genai (plain,
its n-gram lookup, its draft-model mode with our draft), on the same weights, in one run,
interleaved and repeated (median, min, max), overall and per task kind of the prompts.

Decode tokens/s excludes the time to the first token (prefill + first step), which is reported
separately. Each engine's greedy output is compared token for token with its own plain decoding's
(``exact_vs_own_plain``: k of n prompts equal). The analytic speedup of each draft is computed from
the acceptance measured in this run and the per-pass costs measured on the same sessions:
    S = tokens per full pass / (draft passes per cycle * c_draft + c_verify)
"""

from __future__ import annotations

import fnmatch
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conflayers_runtime import (
    GenerationStats,
    LookupConfig,
    Model,
    SamplingConfig,
    TreeConfig,
    load,
    read_manifest,
)
from conflayers_runtime.artifact import artifact_section
from conflayers_runtime.manifest import Manifest
from conflayers_runtime.model import calibrated_lookup, loaded_by_default
from conflayers_runtime.speculative import expected_speedup, measure_pass_costs

from .errors import BenchError, CalibrationError, GenerationError

DEFAULT_PROMPTS = [
    "Write a short poem about the sea.",
    "What is 17 times 23? Explain step by step.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Write a Python function that reverses a string.",
]
UNTAGGED = "untagged"  # the task kind of a prompt its file gives none
# The sampled run (--sampled): every engine that samples, at these settings, prompt i with seed SEED + i.
SAMPLED = SamplingConfig(temperature=0.7, top_p=0.9, seed=0)
# onnxruntime-genai's n-gram engine (its GeneratorParams.set_speculative_options; --genai-ngram):
# the last 3 tokens looked up in the prompt and output, chained lookups, up to 8 tokens drafted,
# adapting down to 2.
DEFAULT_GENAI_NGRAM: dict[str, int | bool] = {
    "ngram_size": 3,
    "max_draft_tokens": 8,
    "ngram_chained_lookup": True,
    "min_adaptive_k": 2,
}


@dataclass(frozen=True)
class BenchPrompt:
    text: str
    task: str = UNTAGGED


def load_bench_prompts(path: str | os.PathLike[str]) -> list[BenchPrompt]:
    """Prompts of a .txt (one a line) or .jsonl file ({"prompt": ..., "task": ...} a line, the task
    kind optional): plain text, one user turn each."""
    from .calibrate.data import load_prompts

    prompts = load_prompts(path)
    if any(not isinstance(p, str) for p in prompts):
        raise CalibrationError(
            "bench prompts must be plain text (one user turn each), not chat message lists"
        )
    tasks = [UNTAGGED] * len(prompts)
    if Path(path).suffix in (".jsonl", ".json"):
        records = [
            json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        tasks = [r["task"] if isinstance(r.get("task"), str) and r["task"] else UNTAGGED for r in records]
    return [BenchPrompt(text, task) for text, task in zip(prompts, tasks, strict=True)]  # type: ignore[arg-type]


@dataclass
class Run:
    """One generation: the new token ids, seconds to the first token and in all, and what the
    engine reports of its speculation (ours: GenerationStats; onnxruntime-genai's: its dict)."""

    tokens: list[int]
    first_s: float
    total_s: float
    stats: GenerationStats | dict[str, Any] | None = None


@dataclass
class Engine:
    """``run(prompt ids, sampling)``; ``reference``: the engine of its own plain decoding, whose
    greedy output its own must equal (None: it is one)."""

    run: Callable[[list[int], SamplingConfig], Run]
    reference: str | None = None


@dataclass(frozen=True)
class OurEngine:
    """One of our engines: ``load(ARTIFACT, device=..., threads=..., **load_kwargs)`` decoding in
    ``mode``. ``pass_costs``: also time its draft's passes (analytic speedup beside the measured)."""

    name: str
    load_kwargs: dict[str, Any]
    mode: str
    pass_costs: bool = False


def our_engines(manifest: Manifest, tree: TreeConfig | None = None) -> list[OurEngine]:
    """The one list of our engines: plain decoding, the lookup alone, speculative decoding with each
    draft alone and beside the lookup (the calibrated one, else LookupConfig's defaults), auto mode
    where the draft is recommended, what load(ARTIFACT) gives a user (the default task's sources,
    mode auto: plain where load() would speculate not), and with ``tree``, each draft through the
    artifact's tree graphs. Engines with the same load_kwargs share one loaded model."""
    drafts = list(artifact_section(manifest).drafts)
    lookup = calibrated_lookup(manifest) or LookupConfig()  # as calibrated, else the runtime's defaults
    engines = [
        OurEngine("ours plain", {"draft": None}, "plain"),
        OurEngine("ours lookup", {"draft": None, "lookup": lookup}, "speculative"),
    ]
    for d in drafts:
        alone = {"draft": d, "lookup": False}
        engines.append(OurEngine(f"ours speculative ({d})", alone, "speculative", pass_costs=True))
        if manifest.draft(d).recommended:  # auto speculates with it, under the speed guard
            engines.append(OurEngine(f"ours auto ({d})", alone, "auto"))
        engines.append(
            OurEngine(f"ours speculative + lookup ({d})", {"draft": d, "lookup": lookup}, "speculative")
        )
    engines.append(OurEngine("ours auto (load defaults)", {"draft": loaded_by_default(manifest)}, "auto"))
    if tree is not None:
        for d in drafts:
            name = f"ours speculative, tree {tree.nodes}x{tree.width} ({d})"
            engines.append(OurEngine(name, {"draft": d, "tree": tree, "lookup": False}, "speculative"))
    return engines


@dataclass(frozen=True)
class GenaiOptions:
    """onnxruntime-genai's engines besides its plain decoding of its own build of the model.
    ``ngram``: its n-gram engine's set_speculative_options (None: no n-gram engine);
    ``draft_tokens``: max_draft_tokens of its draft-model engines (None: with our draft the
    artifact's, from calibration; with its own GENAI_DRAFT_MODEL_TOKENS); ``draft_model``: a model
    source whose build by its builder drafts for its build of ours (its own draft-model mode;
    None: not run)."""

    ngram: dict[str, int | bool] | None = field(default_factory=lambda: dict(DEFAULT_GENAI_NGRAM))
    draft_tokens: int | None = None
    draft_model: str | None = None


@dataclass
class EngineRuns:
    decode_tps: list[float] = field(default_factory=list)  # one value per repeat (all prompts together)
    ttft: list[float] = field(default_factory=list)  # seconds, median over prompts per repeat
    by_task: dict[str, list[float]] = field(default_factory=dict)  # task kind -> decode tok/s per repeat
    stats: GenerationStats | dict[str, Any] | None = None  # speculation of the last repeat, summed
    tokens: list[list[int]] = field(default_factory=list)  # each prompt's output in the last repeat

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "decode_tokens_per_s": _spread(self.decode_tps),
            "time_to_first_token_s": _spread(self.ttft),
            "by_task": {task: {"decode_tokens_per_s": _spread(v)} for task, v in self.by_task.items()},
        }
        if isinstance(self.stats, GenerationStats):
            out |= {
                "acceptance_rate": self.stats.acceptance_rate,
                "mean_tokens_per_cycle": self.stats.mean_tokens_per_cycle,
                "draft_passes_per_cycle": self.stats.draft_passes_per_cycle,
            }
        elif isinstance(self.stats, dict):
            out |= _genai_speculation(self.stats)
        return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


# onnxruntime-genai's speculative statistics that add up over generations (get_speculative_stats).
GENAI_COUNTS = (
    "rounds",
    "draft_tokens_proposed",
    "draft_tokens_evaluated",
    "draft_tokens_accepted",
    "draft_forward_passes",
    "target_forward_passes",
    "standard_fallback_steps",
    "ngram_lookup_hits",
    "ngram_lookup_misses",
)


def _genai_speculation(counts: dict[str, Any]) -> dict[str, object]:
    """Acceptance as onnxruntime-genai counts it (accepted of the drafted tokens its target
    verified), beside its raw counts summed over the prompts."""
    evaluated = counts["draft_tokens_evaluated"]
    return {
        "acceptance_rate": counts["draft_tokens_accepted"] / evaluated if evaluated else 0.0,
        "genai_speculative_stats": counts,
    }


def run_bench(
    artifact: str | os.PathLike[str],
    prompts: Sequence[str | BenchPrompt],
    max_new_tokens: int = 128,
    repeats: int = 3,
    threads: int = 2,
    device: str = "cpu",
    with_transformers: bool = True,
    with_genai: bool = True,
    progress: Callable[[str], None] = lambda line: None,
    tree: TreeConfig | None = None,
    genai: GenaiOptions | None = None,
    sampled: bool = False,
    only: Sequence[str] = (),
) -> dict[str, object]:
    """Every engine on ``prompts``, interleaved ``repeats`` times; pass costs of each draft.
    ``tree``: also speculative decoding with token trees of that shape, with each draft.
    ``genai``: onnxruntime-genai's engines beside its plain one (default: GenaiOptions()).
    ``sampled``: also a run of every engine sampling at SAMPLED (key "sampled").
    ``only``: shell-style patterns of the engine names to run (select_engines); empty: all."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    bench_prompts = [p if isinstance(p, BenchPrompt) else BenchPrompt(p) for p in prompts]
    baselines: dict[str, Engine] = {}
    # The baselines before our drafts' sessions: onnxruntime-genai's builder loads the model in a
    # process of its own (with everything open at once, a 1.5B model in float32 ran this 24 GB
    # machine out of memory).
    plain_model = load(artifact, device=device, draft=None, threads=threads)
    ids = [plain_model.encode(p.text) for p in bench_prompts]
    if with_transformers or with_genai:
        from .models import load_model

        # The same weights, once for both baselines; only transformers needs them in memory.
        loaded = load_model(manifest.model.source, streamed=not with_transformers)
    wanted = _wanted(only)  # engines the patterns leave out are not even loaded (a 1.5B model's are GBs)
    if with_transformers and wanted("transformers generate"):
        baselines["transformers generate"] = _transformers_engine(loaded, max_new_tokens, threads)
    if with_genai:
        baselines |= _genai_engines(
            loaded, artifact, plain_model, max_new_tokens, threads, genai or GenaiOptions(), progress, wanted
        )
    ours, models = _load_our_engines(
        artifact, manifest, plain_model, device, threads, max_new_tokens, tree, wanted
    )
    engines = select_engines(ours | baselines, only)

    results = _time_interleaved(engines, ids, bench_prompts, repeats, SamplingConfig(), progress)
    plain = results["ours plain"]["decode_tokens_per_s"]["median"]
    for spec in our_engines(manifest, tree):
        if spec.pass_costs and spec.name in results:
            _add_pass_costs(results[spec.name], models[spec.name], plain)
    _add_ratios(results, engines)
    out = {
        "artifact": str(artifact),
        "model": manifest.model.source,
        "dtype": artifact_section(manifest).dtype,
        "device": device,
        "threads": threads,
        "prompts": len(prompts),
        "task_kinds": sorted({p.task for p in bench_prompts}),
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "machine": _machine(),
        "engines": results,
    }
    if sampled:
        sampled_results = _time_interleaved(engines, ids, bench_prompts, repeats, SAMPLED, progress)
        _add_ratios(sampled_results, engines, exact=False)
        out["sampled"] = {
            "temperature": SAMPLED.temperature,
            "top_p": SAMPLED.top_p,
            "seeds": f"{SAMPLED.seed} + prompt index",
            "engines": sampled_results,
        }
    return out


def _wanted(patterns: Sequence[str]) -> Callable[..., bool]:
    """``wanted(name, *dependents)``: whether to load the engine ``name``, the own plain decoding
    of ``dependents``: one of the shell-style ``patterns`` matches it or a dependent (all without
    patterns)."""

    def wanted(*names: str) -> bool:
        return not patterns or any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)

    return wanted


def select_engines(engines: dict[str, Engine], patterns: Sequence[str]) -> dict[str, Engine]:
    """The engines whose names match one of the shell-style ``patterns`` (all where there are none),
    with our plain decoding and each kept engine's own plain decoding, which every ratio and
    exactness count needs. A pattern that matches no engine is an error naming them all."""
    if not patterns:
        return engines
    unmatched = [p for p in patterns if not fnmatch.filter(engines, p)]
    if unmatched:
        raise BenchError(
            f"no engine matches {', '.join(map(repr, unmatched))}: the engines of this run are "
            + "; ".join(engines)
            + " (pass --engine patterns that match some)"
        )
    kept = set(filter(_wanted(patterns), engines))
    kept |= {"ours plain"} | {engines[name].reference for name in kept if engines[name].reference}
    return {name: engine for name, engine in engines.items() if name in kept}


def _add_ratios(results: dict[str, dict[str, Any]], engines: dict[str, Engine], exact: bool = True) -> None:
    """Speed over our plain decoding and over the engine's own plain decoding; with ``exact``, the
    prompts on which its output equals its own plain decoding's (greedy runs only)."""
    plain = results["ours plain"]["decode_tokens_per_s"]["median"]
    for name, r in results.items():
        r["over_ours_plain"] = r["decode_tokens_per_s"]["median"] / plain
        reference = engines[name].reference
        if reference is None or reference not in results:
            continue
        r["over_own_plain"] = (
            r["decode_tokens_per_s"]["median"] / results[reference]["decode_tokens_per_s"]["median"]
        )
        if exact:
            mine, theirs = r.pop("_tokens"), results[reference]["_tokens"]
            equal = [a == b for a, b in zip(mine, theirs, strict=True)]
            r["exact_vs_own_plain"] = {"reference": reference, "equal": sum(equal), "prompts": len(equal)}
    for r in results.values():
        r.pop("_tokens", None)


def _load_our_engines(
    artifact: Path,
    manifest: Manifest,
    plain_model: Model,
    device: str,
    threads: int,
    max_new_tokens: int,
    tree: TreeConfig | None,
    wanted: Callable[..., bool],
) -> tuple[dict[str, Engine], dict[str, Model]]:
    """Our engines (our_engines) that are ``wanted`` and our plain decoding, each model loaded once:
    (engines, the model of each engine)."""

    def key(load_kwargs: dict[str, Any]) -> str:
        return repr(sorted(load_kwargs.items()))

    loaded: dict[str, Model] = {key({"draft": None}): plain_model}
    engines, models = {}, {}
    for spec in our_engines(manifest, tree):
        if spec.name != "ours plain" and not wanted(spec.name):
            continue
        kwargs = key(spec.load_kwargs)
        if kwargs not in loaded:
            loaded[kwargs] = load(artifact, device=device, threads=threads, verify=False, **spec.load_kwargs)
        model = models[spec.name] = loaded[kwargs]
        engines[spec.name] = Engine(
            lambda ids, sampling, m=model, mode=spec.mode: _ours(m, ids, max_new_tokens, mode, sampling),
            reference=None if spec.name == "ours plain" else "ours plain",
        )
    return engines, models


def _time_interleaved(
    engines: dict[str, Engine],
    ids: list[list[int]],
    prompts: list[BenchPrompt],
    repeats: int,
    sampling: SamplingConfig,
    progress: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Each repeat runs every engine over every prompt in turn, so load drift hits all alike.
    Sampling: prompt i with seed ``sampling.seed + i``, the same in every repeat."""
    runs = {name: EngineRuns() for name in engines}
    for repeat in range(repeats):
        for name, engine in engines.items():
            per_task: dict[str, list[float]] = {}  # task kind -> [tokens, decode seconds]
            ttfts, outputs, stats = [], [], None
            for i, (prompt_ids, prompt) in enumerate(zip(ids, prompts, strict=True)):
                seeded = sampling if sampling.greedy else _seeded(sampling, i)
                run = engine.run(prompt_ids, seeded)
                totals = per_task.setdefault(prompt.task, [0.0, 0.0])
                totals[0] += len(run.tokens) - 1
                totals[1] += run.total_s - run.first_s
                ttfts.append(run.first_s)
                outputs.append(run.tokens)
                stats = _merge_stats(stats, run.stats)
            tokens, seconds = (sum(t[k] for t in per_task.values()) for k in (0, 1))
            runs[name].decode_tps.append(tokens / seconds)
            runs[name].ttft.append(statistics.median(ttfts))
            for task, (n, s) in per_task.items():
                runs[name].by_task.setdefault(task, []).append(n / s)
            runs[name].stats, runs[name].tokens = stats, outputs
            progress(f"repeat {repeat + 1}/{repeats} {name}: {tokens / seconds:.1f} tok/s")
    return {name: r.summary() | {"_tokens": r.tokens} for name, r in runs.items()}


def _seeded(sampling: SamplingConfig, index: int) -> SamplingConfig:
    return SamplingConfig(sampling.temperature, sampling.top_k, sampling.top_p, (sampling.seed or 0) + index)


def _merge_stats(
    total: GenerationStats | dict[str, Any] | None, stats: GenerationStats | dict[str, Any] | None
) -> GenerationStats | dict[str, Any] | None:
    if stats is None:
        return total
    if isinstance(stats, GenerationStats):
        merged = total if isinstance(total, GenerationStats) else GenerationStats()
        merged.merge(stats)
        return merged
    counts = total if isinstance(total, dict) else dict.fromkeys(GENAI_COUNTS, 0)
    return {k: counts[k] + stats.get(k, 0) for k in GENAI_COUNTS}


def _add_pass_costs(spec: dict[str, Any], model: Model, plain_tokens_per_second: float) -> None:
    """The draft's timed pass costs, the speedup they predict, and the measured one beside it."""
    c_draft, c_verify = measure_pass_costs(
        model.backend,
        context=min(64, model.max_seq_len // 2),
        verify_tokens=max(2, round(spec["draft_passes_per_cycle"]) + 1),
    )
    analytic = expected_speedup(
        spec["mean_tokens_per_cycle"], spec["draft_passes_per_cycle"], c_draft, c_verify
    )
    measured = spec["decode_tokens_per_s"]["median"] / plain_tokens_per_second
    spec |= {
        "c_draft_measured": c_draft,
        "c_verify_measured": c_verify,
        "analytic_speedup": analytic,
        "measured_speedup": measured,
        "measured_over_analytic": measured / analytic,
    }


def _ours(model: Model, ids: list[int], max_new_tokens: int, mode: str, sampling: SamplingConfig) -> Run:
    start = time.perf_counter()
    first = None
    for _ in model.stream(ids, max_new_tokens, mode=mode, sampling=sampling):
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return Run(list(model.last_token_ids), first or total, total, model.last_stats)


def _transformers_engine(loaded, max_new_tokens: int, threads: int) -> Engine:
    import torch

    torch.set_num_threads(threads)

    def run(prompt_ids: list[int], sampling: SamplingConfig) -> Run:
        ids = torch.tensor([prompt_ids])
        kwargs: dict[str, Any] = dict(
            attention_mask=torch.ones_like(ids),
            do_sample=not sampling.greedy,
            eos_token_id=loaded.stop_token_ids,
            pad_token_id=loaded.stop_token_ids[0],
        )
        if not sampling.greedy:
            kwargs |= dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        with torch.inference_mode():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            start = time.perf_counter()
            loaded.model.generate(ids, max_new_tokens=1, **kwargs)
            first = time.perf_counter() - start
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            start = time.perf_counter()
            out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, **kwargs)
            total = time.perf_counter() - start
        return Run(out[0, ids.shape[1] :].tolist(), first, total)

    return Engine(run)


# Our artifact dtype -> the onnxruntime-genai builder's precision and execution provider.
GENAI_PRECISIONS = {
    "fp32": ("fp32", "cpu"),
    "int4": ("int4", "cpu"),
    "fp16": ("fp16", "cuda"),
    "int4-fp16": ("int4", "cuda"),
}


def genai_model_folder(source_folder: Path, target: Path, threads: int, dtype: str = "fp32") -> Path:
    """Build the model with onnxruntime-genai's own builder (at the precision matching ours), once,
    offline. Its own defaults otherwise (int4: its block size and CPU accuracy level)."""
    precision, provider = GENAI_PRECISIONS[dtype]
    if not (target / "genai_config.json").is_file():
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        command = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-m",
            str(source_folder),
            "-i",
            str(source_folder),
            "-o",
            str(target),
            "-p",
            precision,
            "-e",
            provider,
            "-c",
            str(target / ".cache"),
            "--extra_options",
            "hf_token=false",
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"onnxruntime-genai's builder failed on this model: {last}")
    config_path = target / "genai_config.json"
    config = json.loads(config_path.read_text())
    session = config["model"]["decoder"]["session_options"]
    # Same thread count as every other engine (its default runs at about one thread here).
    session["intra_op_num_threads"] = threads
    if provider == "cuda":  # the fastest way a user runs it on a GPU: decode steps in CUDA graphs
        options = session.setdefault("provider_options", [])
        cuda = next((o["cuda"] for o in options if "cuda" in o), None)
        if cuda is None:
            options.append({"cuda": (cuda := {})})
        cuda["enable_cuda_graph"] = "1"
    config_path.write_text(json.dumps(config, indent=2))
    return target


GENAI_PLAIN = "onnxruntime-genai"  # its plain decoding of its own build of the model
GENAI_OUR_FULL = "onnxruntime-genai, our full graph"  # its plain decoding of our artifact's full graph


def _genai_engines(
    loaded,
    artifact: Path,
    model: Model,
    max_new_tokens: int,
    threads: int,
    options: GenaiOptions,
    progress: Callable[[str], None],
    wanted: Callable[..., bool],
) -> dict[str, Engine]:
    """onnxruntime-genai's engines: plain decoding of its own build of the model (its builder, at our
    artifact's precision), its n-gram mode and its draft-model mode with a draft it built (where
    ``options`` ask) on that build; plain decoding of our full graph and its draft-model mode with
    our draft, from the artifact folder itself. Only those ``wanted`` (_wanted), with the plain
    decodings they need."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        progress("onnxruntime-genai not installed (pip install -e .[interop]): skipped")
        return {}
    from .models import cache_dir

    engines: dict[str, Engine] = {}
    dtype = artifact_section(model.manifest).dtype
    ngram_name = "onnxruntime-genai n-gram" if options.ngram is not None else None
    draft_name = f"onnxruntime-genai, draft model ({options.draft_model})" if options.draft_model else None
    own = [name for name in (ngram_name, draft_name) if name and wanted(name)]
    if wanted(GENAI_PLAIN, *own):
        try:
            folder = genai_model_folder(
                loaded.folder, cache_dir() / "genai" / f"{loaded.folder.name}-{dtype}", threads, dtype
            )
        except RuntimeError as exc:  # report and bench the other engines
            progress(f"{exc}: onnxruntime-genai's own build skipped")
        else:
            built = og.Model(str(folder))
            engines[GENAI_PLAIN] = Engine(_genai_runner(og, built, max_new_tokens))
            if ngram_name in own:
                _check_speculative_options(og, built, options.ngram)
                ngram = _genai_runner(og, built, max_new_tokens, options.ngram)
                engines[ngram_name] = Engine(ngram, reference=GENAI_PLAIN)
            if draft_name in own:
                engines[draft_name] = _genai_draft_model_engine(
                    og, folder, options, dtype, max_new_tokens, threads
                )
    return engines | _genai_artifact_engines(og, artifact, max_new_tokens, threads, options, progress, wanted)


GENAI_DRAFT_MODEL_TOKENS = 4  # its draft-model mode's draft length where --genai-draft-tokens is not given


def _genai_draft_model_engine(
    og, target: Path, options: GenaiOptions, dtype: str, max_new_tokens: int, threads: int
) -> Engine:
    """onnxruntime-genai's draft-model mode with its own builds of the model and of
    ``options.draft_model`` (at the same precision), from one folder (genai_draft_pair)."""
    from .models import cache_dir, load_model

    source = load_model(str(options.draft_model), streamed=True).folder
    draft = genai_model_folder(source, cache_dir() / "genai" / f"{source.name}-{dtype}", threads, dtype)
    pair = genai_draft_pair(target, draft)
    block = json.loads((draft / "genai_config.json").read_text())["model"]["decoder"]
    block["filename"] = f"{GENAI_DRAFT_FOLDER}/{block['filename']}"
    block.setdefault("session_options", {})["intra_op_num_threads"] = threads
    length = options.draft_tokens or GENAI_DRAFT_MODEL_TOKENS
    config = og.Config(str(pair))
    config.overlay(json.dumps({"model": {"draft": block}, "speculative": {"max_draft_tokens": length}}))
    return Engine(_genai_runner(og, og.Model(config), max_new_tokens, speculates=True), reference=GENAI_PLAIN)


GENAI_DRAFT_FOLDER = "draft"


def genai_draft_pair(target: Path, draft: Path) -> Path:
    """A folder onnxruntime-genai opens as its build of the model with its build of a draft model:
    the target's files, and the draft's in GENAI_DRAFT_FOLDER (it refuses '..' in a config's file
    names), hard-linked where the file system allows (else copied), remade each time."""
    import shutil

    from .staging import replace_folder

    pair = target.with_name(f"{target.name}+draft-{draft.name}")
    with replace_folder(pair) as staging:
        (staging / GENAI_DRAFT_FOLDER).mkdir()
        for source, into in ((target, staging), (draft, staging / GENAI_DRAFT_FOLDER)):
            for file in (f for f in source.iterdir() if f.is_file()):
                try:
                    os.link(file, into / file.name)
                except OSError:
                    shutil.copy2(file, into / file.name)
    return pair


def _check_speculative_options(og, model, options: dict[str, Any]) -> None:
    """Refused n-gram settings as an error before any timing, not midway through the run."""
    try:
        og.GeneratorParams(model).set_speculative_options(**options)
    except (RuntimeError, TypeError) as exc:
        raise GenerationError(
            f"onnxruntime-genai refuses the n-gram settings {options} ({exc}): see its "
            "GeneratorParams.set_speculative_options, e.g. ngram_size=3,max_draft_tokens=8"
        ) from None


def _genai_artifact_engines(
    og,
    artifact: Path,
    max_new_tokens: int,
    threads: int,
    options: GenaiOptions,
    progress: Callable[[str], None],
    wanted: Callable[..., bool],
) -> dict[str, Engine]:
    """onnxruntime-genai on the artifact folder: plainly (genai_config.json), and with our draft
    (genai_speculative.json on top, as a user opens it); those ``wanted``."""
    from .export.build import GENAI_CONFIG, GENAI_SPECULATIVE

    if not (artifact / GENAI_CONFIG).is_file():
        progress(
            f"{artifact} has no {GENAI_CONFIG} (an older build): rebuild it for onnxruntime-genai's engines"
        )
        return {}
    draft_name = None
    if (artifact / GENAI_SPECULATIVE).is_file():
        draft_file = json.loads((artifact / GENAI_SPECULATIVE).read_text())["model"]["draft"]["filename"]
        draft = draft_file.removeprefix("draft.").removesuffix(".onnx")
        draft_name = f"onnxruntime-genai, our draft ({draft})"
    if not wanted(GENAI_OUR_FULL, *([draft_name] if draft_name else [])):
        return {}
    engines = {
        GENAI_OUR_FULL: Engine(
            _genai_runner(og, og.Model(genai_config(og, artifact, threads)), max_new_tokens)
        )
    }
    if draft_name is None:
        progress(
            f"{artifact} has no {GENAI_SPECULATIVE}: its default draft scores a pruned vocabulary, which "
            "onnxruntime-genai cannot verify, or the artifact predates it"
        )
        return engines
    if wanted(draft_name):
        config = genai_config(og, artifact, threads, speculative=True)
        length = None if options.draft_tokens is None else {"max_draft_tokens": options.draft_tokens}
        run = _genai_runner(og, og.Model(config), max_new_tokens, length, speculates=True)
        engines[draft_name] = Engine(run, reference=GENAI_OUR_FULL)
    return engines


def genai_config(og, artifact: str | os.PathLike[str], threads: int | None = None, speculative: bool = False):
    """onnxruntime-genai's Config of an artifact folder: its genai_config.json, with
    ``speculative`` our default draft as the draft model (genai_speculative.json on top), and
    ``threads`` intra-op threads in each session."""
    from .export.build import GENAI_SPECULATIVE

    config = og.Config(str(artifact))
    sessions = ["decoder"]
    if speculative:
        config.overlay((Path(artifact) / GENAI_SPECULATIVE).read_text())
        sessions.append("draft")
    if threads is not None:
        options = {"session_options": {"intra_op_num_threads": threads}}
        config.overlay(json.dumps({"model": dict.fromkeys(sessions, options)}))
    return config


def _genai_runner(
    og, model, max_new_tokens: int, speculative: dict[str, Any] | None = None, speculates: bool = False
) -> Callable[[list[int], SamplingConfig], Run]:
    """Generation with onnxruntime-genai's own loop; ``speculative``: its set_speculative_options
    (n-gram lookup, or the length of a draft model's drafts). ``speculates``: the model has a draft
    model, so its statistics count even without ``speculative``."""

    def run(ids: list[int], sampling: SamplingConfig) -> Run:
        params = og.GeneratorParams(model)
        search: dict[str, Any] = {"max_length": len(ids) + max_new_tokens, "do_sample": not sampling.greedy}
        if not sampling.greedy:  # top_k 0: no top-k cut (the artifact's config sets 1, greedy)
            search |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
            if sampling.seed is not None:
                search["random_seed"] = sampling.seed
        params.set_search_options(**search)
        if speculative:
            params.set_speculative_options(**speculative)
        start = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter() - start
        while not generator.is_done():
            generator.generate_next_token()
        total = time.perf_counter() - start
        tokens = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
        stats = generator.get_speculative_stats() if speculative or speculates else None
        return Run(tokens, first, total, stats)

    return run


def _machine() -> dict[str, object]:
    import platform

    import onnxruntime

    return {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


def plot(result: dict[str, object], path: str | os.PathLike[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = result["engines"]  # type: ignore[assignment]
    names = list(engines)
    medians = [engines[n]["decode_tokens_per_s"]["median"] for n in names]
    lows = [m - engines[n]["decode_tokens_per_s"]["min"] for n, m in zip(names, medians, strict=True)]
    highs = [engines[n]["decode_tokens_per_s"]["max"] - m for n, m in zip(names, medians, strict=True)]
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(names) + 1.5))
    ax.barh(names, medians, xerr=[lows, highs], color="tab:blue")
    ax.set(
        xlabel="decode tokens/s (median, min-max)",
        title=f"{result['model']} {result['dtype']} {result['device']}",
    )
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
