"""``bench``: our plain and speculative decoding against transformers and onnxruntime-genai, on the
same weights, in one run, interleaved and repeated (median, min, max).

Decode tokens/s excludes the time to the first token (prefill + first step), which is reported
separately. The analytic speedup of each draft is computed from the acceptance measured in this
run and the per-pass costs measured on the same sessions:
    S = tokens per full pass / (draft passes per cycle * c_draft + c_verify)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conflayers_runtime import GenerationStats, Model, TreeConfig, load, read_manifest
from conflayers_runtime.artifact import artifact_section
from conflayers_runtime.manifest import Manifest
from conflayers_runtime.model import loaded_by_default
from conflayers_runtime.speculative import expected_speedup, measure_pass_costs

DEFAULT_PROMPTS = [
    "Write a short poem about the sea.",
    "What is 17 times 23? Explain step by step.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Write a Python function that reverses a string.",
]


@dataclass
class EngineRuns:
    decode_tps: list[float] = field(default_factory=list)  # one value per repeat (all prompts together)
    ttft: list[float] = field(default_factory=list)  # seconds, median over prompts per repeat
    stats: GenerationStats | None = None  # our engines: acceptance etc. of the last repeat

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "decode_tokens_per_s": _spread(self.decode_tps),
            "time_to_first_token_s": _spread(self.ttft),
        }
        if self.stats is not None:
            out |= {
                "acceptance_rate": self.stats.acceptance_rate,
                "mean_tokens_per_cycle": self.stats.mean_tokens_per_cycle,
                "draft_passes_per_cycle": self.stats.draft_passes_per_cycle,
            }
        return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


Timed = tuple[
    int, float, float, GenerationStats | None
]  # tokens, seconds to first token, total seconds, stats


def run_bench(
    artifact: str | os.PathLike[str],
    prompts: list[str],
    max_new_tokens: int = 128,
    repeats: int = 3,
    threads: int = 2,
    device: str = "cpu",
    with_transformers: bool = True,
    with_genai: bool = True,
    progress: Callable[[str], None] = lambda line: None,
    tree: TreeConfig | None = None,
) -> dict[str, object]:
    """Every engine on ``prompts``, interleaved ``repeats`` times; pass costs of each draft.
    ``tree``: also speculative decoding with token trees of that shape, with each draft."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    baselines: dict[str, Callable[[str], Timed]] = {}
    # The baselines before our drafts' sessions: onnxruntime-genai's builder loads the model in a
    # process of its own (with everything open at once, a 1.5B model in float32 ran this 24 GB
    # machine out of memory).
    plain_model = load(artifact, device=device, draft=None, threads=threads)
    if with_transformers or with_genai:
        from .models import load_model

        # The same weights, once for both baselines; only transformers needs them in memory.
        loaded = load_model(manifest.model.source, streamed=not with_transformers)
    if with_transformers:
        transformers = _transformers_engine(loaded, plain_model, max_new_tokens, threads)
        baselines["transformers generate"] = transformers
    if with_genai:
        genai = _genai_engine(loaded, plain_model, max_new_tokens, threads, progress)
        if genai is not None:
            baselines["onnxruntime-genai"] = genai
    drafts = list(artifact_section(manifest).drafts)
    spec_models = {d: load(artifact, device=device, draft=d, threads=threads, verify=False) for d in drafts}
    engines = _our_engines(manifest, plain_model, spec_models, max_new_tokens) | baselines
    if tree is not None:  # each draft again, through the artifact's tree graphs (tree.py)
        for d in drafts:
            model = load(artifact, device=device, draft=d, threads=threads, verify=False, tree=tree)
            name = f"ours speculative, tree {tree.nodes}x{tree.width} ({d})"
            engines[name] = lambda p, m=model: _ours(m, p, max_new_tokens, "speculative")

    results = _time_interleaved(engines, prompts, repeats, progress)
    plain = results["ours plain"]["decode_tokens_per_s"]["median"]  # type: ignore[index]
    for name, model in spec_models.items():
        _add_pass_costs(results[f"ours speculative ({name})"], model, plain)
    for r in results.values():
        r["over_ours_plain"] = r["decode_tokens_per_s"]["median"] / plain  # type: ignore[index]
    return {
        "artifact": str(artifact),
        "model": manifest.model.source,
        "dtype": artifact_section(manifest).dtype,
        "device": device,
        "threads": threads,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "machine": _machine(),
        "engines": results,
    }


def _our_engines(
    manifest: Manifest, plain_model: Model, spec_models: dict[str, Model], max_new_tokens: int
) -> dict[str, Callable[[str], Timed]]:
    """Our plain decoding, speculative decoding with each draft, auto mode where the draft is
    recommended, and what load(ARTIFACT) gives a user (the default task's draft, mode auto: the
    sessions already open for that draft, or the plain model where load() would speculate not)."""
    engines: dict[str, Callable[[str], Timed]] = {
        "ours plain": lambda p: _ours(plain_model, p, max_new_tokens, "plain")
    }
    for name, model in spec_models.items():
        engines[f"ours speculative ({name})"] = lambda p, m=model: _ours(m, p, max_new_tokens, "speculative")
        if manifest.draft(name).recommended:  # auto speculates with it, under the speed guard
            engines[f"ours auto ({name})"] = lambda p, m=model: _ours(m, p, max_new_tokens, "auto")
    default = loaded_by_default(manifest)
    auto_model = spec_models[default] if default is not None else plain_model
    engines["ours auto (load defaults)"] = lambda p: _ours(auto_model, p, max_new_tokens, "auto")
    return engines


def _time_interleaved(
    engines: dict[str, Callable[[str], Timed]],
    prompts: list[str],
    repeats: int,
    progress: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Each repeat runs every engine over every prompt in turn, so load drift hits all alike."""
    runs = {name: EngineRuns() for name in engines}
    for repeat in range(repeats):
        for name, engine in engines.items():
            tokens = decode_seconds = 0.0
            ttfts = []
            total_stats = GenerationStats() if not name.startswith(("transformers", "onnxruntime")) else None
            for prompt in prompts:
                n, first, total, stats = engine(prompt)
                tokens += n - 1
                decode_seconds += total - first
                ttfts.append(first)
                if total_stats is not None and stats is not None:
                    total_stats.merge(stats)
            runs[name].decode_tps.append(tokens / decode_seconds)
            runs[name].ttft.append(statistics.median(ttfts))
            runs[name].stats = total_stats
            progress(f"repeat {repeat + 1}/{repeats} {name}: {tokens / decode_seconds:.1f} tok/s")
    return {name: r.summary() for name, r in runs.items()}


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


def _ours(model, prompt: str, max_new_tokens: int, mode: str) -> Timed:
    start = time.perf_counter()
    first = None
    for _ in model.stream(prompt, max_new_tokens, mode=mode):
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return model.last_stats.new_tokens, first or total, total, model.last_stats


def _transformers_engine(loaded, model, max_new_tokens: int, threads: int) -> Callable[[str], Timed]:
    import torch

    torch.set_num_threads(threads)

    def run(prompt: str) -> Timed:
        ids = torch.tensor([model.encode(prompt)])
        mask = torch.ones_like(ids)
        kwargs = dict(
            attention_mask=mask,
            do_sample=False,
            eos_token_id=loaded.stop_token_ids,
            pad_token_id=loaded.stop_token_ids[0],
        )
        with torch.inference_mode():
            start = time.perf_counter()
            loaded.model.generate(ids, max_new_tokens=1, **kwargs)
            first = time.perf_counter() - start
            start = time.perf_counter()
            out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, **kwargs)
            total = time.perf_counter() - start
        return out.shape[1] - ids.shape[1], first, total, None

    return run


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


def _genai_engine(
    loaded, model, max_new_tokens: int, threads: int, progress: Callable[[str], None]
) -> Callable[[str], Timed] | None:
    try:
        import onnxruntime_genai as og
    except ImportError:
        progress("onnxruntime-genai not installed (pip install -e .[interop]): skipped")
        return None
    from .models import cache_dir

    try:
        dtype = artifact_section(model.manifest).dtype
        target = cache_dir() / "genai" / f"{loaded.folder.name}-{dtype}"
        folder = genai_model_folder(loaded.folder, target, threads, dtype)
    except RuntimeError as exc:  # report and bench the other engines
        progress(f"{exc}: onnxruntime-genai skipped")
        return None
    genai_model = og.Model(str(folder))

    def run(prompt: str) -> Timed:
        ids = model.encode(prompt)
        params = og.GeneratorParams(genai_model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        start = time.perf_counter()
        generator = og.Generator(genai_model, params)
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter() - start
        n = 1
        while not generator.is_done():
            generator.generate_next_token()
            n += 1
        return n, first, time.perf_counter() - start, None

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
