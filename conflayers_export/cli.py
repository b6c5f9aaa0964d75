"""The ``conflayers-export`` command line: a thin click layer over the library.

Heavy modules (torch, transformers) are imported inside the commands so ``--help`` is instant.
Library errors (:class:`ConflayersError`) become one red line and exit code 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click
from conflayers_runtime.errors import ConflayersError, SkipSetError
from conflayers_runtime.manifest import ARTIFACT_DTYPES, WEIGHT_PRECISIONS, skip_unit_layer

from .progress import ConsoleProgress

if TYPE_CHECKING:
    from conflayers_runtime import SamplingConfig

    from .calibrate import CalibrationSettings, TaskResult
    from .export.validate import StepResult
    from .models import LoadedModel

DEFAULT_MODEL = "smollm2-135m"


def _parse_skip(value: str) -> list[int | str]:
    """--skip: layer indices, and single blocks as <layer>.attention / <layer>.mlp (3,7.mlp,9);
    checked against the model by check_skip_layers."""
    units: list[int | str] = [int(v) if v.isdigit() else v for v in map(str.strip, value.split(",")) if v]
    for unit in units:
        if skip_unit_layer(unit) is None:
            raise SkipSetError(
                f"--skip takes layer indices and blocks such as 3,7,5.mlp,9.attention; got {unit!r}"
            )
    return units


def _dtype_option(help_text: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    choices = click.Choice(list(ARTIFACT_DTYPES))  # the runtime's list: --help imports no torch
    return click.option("--dtype", default="fp32", show_default=True, type=choices, help=help_text)


def _sampling_options(command: Callable[..., None]) -> Callable[..., None]:
    """--temperature, --top-k, --top-p and --seed, handed to the command as one ``sampling`` config."""

    @functools.wraps(command)
    def with_sampling(
        *args: object, temperature: float, top_k: int, top_p: float, seed: int, **kwargs: object
    ):
        from conflayers_runtime import SamplingConfig

        return command(*args, sampling=SamplingConfig(temperature, top_k, top_p, seed), **kwargs)

    with_sampling = click.option("--seed", default=0, show_default=True, type=int)(with_sampling)
    with_sampling = click.option("--top-p", default=1.0, show_default=True, type=float)(with_sampling)
    with_sampling = click.option("--top-k", default=0, show_default=True, type=int, help="0 = off.")(
        with_sampling
    )
    return click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")(
        with_sampling
    )


@click.group()
@click.version_option(package_name="conflayers-export")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def cli(verbose: bool) -> None:
    """Layer-skip self-speculative decoding (ConfLayers): calibrate, build, generate."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


@cli.command()
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Packaged name, .gguf file or Hugging Face folder.",
)
@click.option("--prompt", required=True, help="Prompt text.")
@click.option(
    "--skip",
    default="",
    help="Layers the draft skips, e.g. 14,15,16, or blocks, e.g. 5.mlp (empty: draft = full model).",
)
@click.option("--chat/--no-chat", default=True, show_default=True, help="Apply the model's chat template.")
@click.option("--plain", is_flag=True, help="Decode without speculation (the baseline).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--max-draft",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most tokens drafted per cycle.",
)
@_sampling_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def reference(
    model: str,
    prompt: str,
    skip: str,
    chat: bool,
    plain: bool,
    max_new_tokens: int,
    max_draft: int,
    sampling: SamplingConfig,
    as_json: bool,
) -> None:
    """Generate with the PyTorch reference self-speculative decoder and print text and stats."""
    from conflayers_runtime import DraftConfig
    from conflayers_runtime.cli import acceptance_text

    from .models import load_model
    from .models.reference import speculative_generate

    skip_layers = _parse_skip(skip)
    loaded = load_model(model)
    prompt_ids = loaded.encode(prompt, chat=chat)
    start = time.perf_counter()
    tokens, stats = speculative_generate(
        loaded.model,
        loaded.architecture,
        prompt_ids,
        skip_layers,
        max_new_tokens,
        sampling,
        None if plain else DraftConfig(max_draft_tokens=max_draft),
        loaded.stop_token_ids,
    )
    seconds = time.perf_counter() - start
    text = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    result = {
        "model": model,
        "skip_layers": skip_layers,
        "mode": "plain" if plain else "speculative",
        "text": text,
        "seconds": seconds,
        "tokens_per_second": len(tokens) / seconds,
        **stats.as_dict(),
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(text)
    click.echo(
        f"\n[{result['mode']}, skip {skip_layers or 'none'}] {len(tokens)} tokens in {seconds:.2f} s "
        f"({result['tokens_per_second']:.1f} tok/s); acceptance "
        f"{acceptance_text(stats.acceptance_rate, not plain)}, "
        f"{stats.mean_tokens_per_cycle:.2f} tokens per full-model pass, "
        f"accepted-length histogram {stats.accepted_histogram}",
        err=True,
    )


@cli.command()
@click.option(
    "--model", default=DEFAULT_MODEL, show_default=True, help="Packaged name, .gguf file or HF folder."
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--data",
    default=None,
    type=click.Path(dir_okay=False),
    help="Calibration prompts (.jsonl with prompt/messages, or .txt one per line). Default: shipped set.",
)
@click.option(
    "--task", "task_files", multiple=True, metavar="NAME=FILE", help="One skip set per task (repeatable)."
)
@click.option(
    "--config",
    "config_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="TOML file of further settings (docs/CALIBRATE_CONFIG.md); the options here override it.",
)
@click.option(
    "--skip-ratio", default=0.4, show_default=True, type=float, help="Target share of layers skipped."
)
@click.option("--max-iter", default=20, show_default=True, type=int, help="Search iterations per task.")
@click.option(
    "--max-new-tokens", default=48, show_default=True, type=int, help="Tokens generated per prompt."
)
@click.option(
    "--search",
    default="cost-aware",
    show_default=True,
    type=click.Choice(["cost-aware", "published", "both"]),
    help="Layer search: ours, the reference's outer loop, or both side by side (ours ships).",
)
@click.option(
    "--cost",
    default=None,
    type=click.Choice(["bytes", "measured", "table"]),
    help="Draft cost in the final choice: passes timed on --device (default), weight bytes read per "
    "token, or the --costs table (implied by --costs).",
)
@click.option(
    "--costs",
    "costs_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Cost table measured on the target device by `conflayers-run profile` (docs/COSTS.md).",
)
@_dtype_option("Artifact dtype the drafts are chosen for (build with the same).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option(
    "--reference-device",
    default=None,
    type=click.Choice(["cpu", "cuda"]),
    help="Where the layer search's PyTorch reference runs (default: --device).",
)
@click.option(
    "--stage",
    default="all",
    show_default=True,
    type=click.Choice(["all", "search", "select", "profile-artifact"]),
    help="search: the layer search alone (writes calibration/search.json); select: the draft that "
    "ships, from that search (e.g. again for another --dtype or --device); profile-artifact: build "
    "into --out the artifact `conflayers-run profile` times for --costs.",
)
@click.option("--force", is_flag=True, help="Replace a folder that holds another model's manifest.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines (errors still print).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def calibrate(
    ctx: click.Context,
    model: str,
    out_dir: str,
    data: str | None,
    task_files: tuple[str, ...],
    config_file: str | None,
    costs_file: str | None,
    stage: str,
    force: bool,
    quiet: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Search the layers to skip (ConfLayers), then the cheapest draft (skip set x weight precision
    x vocabulary x draft length) on the target graphs; write the manifest and a report into --out.
    The remaining settings (search interval, precisions and vocabularies tried, token trees...) are
    read from --config."""
    from conflayers_runtime.costs import read_cost_table

    from .calibrate import calibrate as run_calibration
    from .calibrate import check_settings, search_layers, select_drafts
    from .models import load_model

    settings = _calibration_settings(ctx, config_file, costs_file)
    check_settings(settings)  # before the data and the model load: bad settings fail fast
    costs = read_cost_table(costs_file) if costs_file else None
    tasks = _calibration_tasks(task_files, data)
    # The float32 model is needed in memory only where it is the PyTorch reference itself; graphs
    # are built from the weight files either way (a 7B model calibrates with its reference on a GPU
    # without 28 GB of host memory for a float32 copy).
    reference_in_memory = (settings.reference_device, settings.reference_dtype, settings.device_map) == (
        "cpu",
        "float32",
        None,
    )
    loaded = load_model(model, streamed=stage == "profile-artifact" or not reference_in_memory)
    progress = ConsoleProgress(quiet)
    if stage == "profile-artifact":
        _profiling_artifact(out_dir, loaded, settings.dtype, force, progress)
    elif stage == "search":
        _report_search(out_dir, search_layers(out_dir, loaded, tasks, settings, force, progress), as_json)
    else:
        if stage == "select":
            _, results = select_drafts(out_dir, loaded, settings, progress, costs=costs)
        else:
            _, results = run_calibration(out_dir, loaded, tasks, settings, force, progress, costs)
        _report_calibration(out_dir, model, results, as_json)


def _calibration_settings(
    ctx: click.Context, config_file: str | None, costs_file: str | None
) -> CalibrationSettings:
    """The settings' defaults, overridden by the --config file, overridden by the options given."""
    from click.core import ParameterSource

    from .calibrate import CalibrationSettings
    from .calibrate.config import COMMAND_LINE_SETTINGS, read_config

    chosen = read_config(config_file) if config_file else {}
    for key in COMMAND_LINE_SETTINGS:  # an option's default yields to the file; one given wins
        given = ctx.get_parameter_source(key) is not ParameterSource.DEFAULT
        if ctx.params[key] is not None and (given or key not in chosen):
            chosen[key] = ctx.params[key]
    chosen.setdefault("cost", "table" if costs_file else "measured")
    chosen.setdefault("reference_device", chosen["device"])
    chosen.setdefault("reference_dtype", "float16" if chosen["reference_device"] == "cuda" else "float32")
    return CalibrationSettings(**chosen)


def _calibration_tasks(task_files: Sequence[str], data: str | None) -> dict[str, list]:
    """--task NAME=FILE prompts per task, else one task of --data (or the shipped prompts)."""
    from .calibrate.data import default_prompts, load_prompts
    from .errors import CalibrationError

    tasks = {}
    for spec in task_files:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CalibrationError(f"--task takes NAME=FILE, got {spec!r}")
        tasks[name] = load_prompts(path)
    return tasks or {"default": load_prompts(data) if data else default_prompts()}


def _report_search(out_dir: str, results: Sequence[TaskResult], as_json: bool) -> None:
    """calibrate --stage search: each task's skip set, and what to run next."""
    found = [
        {"task": r.task, "skip_layers": r.chosen.skip, "expected_speedup": r.chosen.expected_speedup}
        for r in results
    ]
    if as_json:
        click.echo(json.dumps({"out": out_dir, "tasks": found}, indent=2))
        return
    for row in found:
        click.echo(
            f"{row['task']}: the layer search chose {row['skip_layers']} (expected speedup "
            f"{row['expected_speedup']:.2f}x with the bytes model)"
        )
    click.echo(f"wrote {out_dir}/calibration/search.json; next: calibrate --stage select --out {out_dir}")


def _report_calibration(out_dir: str, model: str, results: Sequence[TaskResult], as_json: bool) -> None:
    """calibrate (all stages, or select): each task's draft and verdict."""
    summary = [_calibration_summary(r) for r in results]
    if as_json:
        click.echo(json.dumps({"out": out_dir, "tasks": summary}, indent=2))
        return
    for r, row in zip(results, summary, strict=True):
        click.echo(_calibration_verdict(r, row, model))
    click.echo(f"wrote {out_dir}/manifest.json and {out_dir}/calibration/report.md")


def _profiling_artifact(
    out_dir: str, loaded: LoadedModel, dtype: str, force: bool, progress: ConsoleProgress
) -> None:
    """calibrate --stage profile-artifact: build it, and say what to run next."""
    from .calibrate.costs import build_profiling_artifact, profiling_drafts

    count = len(profiling_drafts(loaded.identity.num_layers, loaded.model.config.vocab_size, dtype))
    with progress.phase(f"building the profiling artifact ({count} drafts, {dtype})", count + 3) as step:
        manifest = build_profiling_artifact(out_dir, loaded, dtype, force, lambda name: step())
    click.echo(
        f"built {out_dir} ({len(manifest.drafts)} drafts); on the target device run "
        f"`conflayers-run profile {out_dir} --device cpu|cuda --out costs.json`, then "
        f"`conflayers-export calibrate --dtype {dtype} --costs costs.json ...`"
    )


def _calibration_summary(r: TaskResult) -> dict[str, object]:
    """One task's result as the JSON output reports it."""
    assert r.drafts is not None
    c = r.drafts.chosen
    return {
        "task": r.task,
        "skip_layers": c.skip,
        "weight_precision": c.weight_precision,
        "vocab_size": c.vocab_size,
        "max_draft_tokens": c.max_draft_tokens,
        "confidence_threshold": c.confidence_threshold,
        "recommended": r.drafts.recommended,
        **c.metrics(),
        "wall_clock_speedup": r.drafts.wall_clock_speedup,
        "layer_search": {
            "skip_layers": r.chosen.skip,
            "expected_speedup": r.chosen.expected_speedup,
            "best_baseline": dataclasses.asdict(r.best_baseline) if r.best_baseline else None,
            "conflayers_beats_baselines": r.beats_baselines,
            "choices": {k: dataclasses.asdict(c) for k, c in r.choices().items()},
        },
        "seconds": r.seconds + r.drafts.seconds,
    }


def _calibration_verdict(r: TaskResult, row: dict[str, Any], model: str) -> str:
    """One task's result in words: the draft that ships, or why speculation is not recommended."""
    assert r.drafts is not None
    draft = (
        f"{r.drafts.chosen.label} (acceptance {row['acceptance_rate']:.2f}, "
        f"{row['mean_tokens_per_cycle']:.2f} tokens per full pass, c_draft {row['c_draft']:.2f})"
    )
    if row["recommended"]:
        line = f"{r.task}: {draft} -> expected speedup {row['expected_speedup']:.2f}x"
    else:
        line = (
            f"{r.task}: speculation not recommended for {model}: the best draft, {draft}, is "
            f"expected to run at {row['expected_speedup']:.2f}x plain decoding."
        )
    if r.search == "both" and r.published is not None:
        line += (
            f"\n{r.task}: layer search, published loop {r.published.skip} (expected speedup "
            f"{r.published.expected_speedup:.2f}x) vs cost-aware {r.chosen.skip} "
            f"({r.chosen.expected_speedup:.2f}x, ships); see the report"
        )
    return line


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--model",
    default=None,
    help="Model to export (default: the one named in DIR's manifest; required without one).",
)
@click.option(
    "--skip-set", "skip_sets", multiple=True, help="Build only this draft of the manifest (repeatable)."
)
@click.option(
    "--skip",
    default=None,
    help="Also build a draft skipping these layers, e.g. 3,7,11, or single blocks, e.g. 5.attention,9.mlp "
    "(named 'manual').",
)
@click.option(
    "--draft-precision",
    default=None,
    type=click.Choice(WEIGHT_PRECISIONS),
    help="Weights of the 'manual' draft (base: the artifact's dtype).",
)
@click.option(
    "--draft-vocab",
    default=None,
    type=click.IntRange(min=1),
    help="Pruned output vocabulary of the 'manual' draft (needs calibrate's ranking).",
)
@_dtype_option("fp32 for CPU, fp16 for CUDA; int4 (CPU) and int4-fp16 (CUDA): MatMulNBits weights.")
@click.option(
    "--max-seq-len",
    default=2048,
    show_default=True,
    type=click.IntRange(min=16),
    help="KV-cache length: prompt + generated tokens must fit.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build(
    out_dir: str,
    model: str | None,
    skip_sets: tuple[str, ...],
    skip: str | None,
    draft_precision: str | None,
    draft_vocab: int | None,
    dtype: str,
    max_seq_len: int,
    quiet: bool,
    as_json: bool,
) -> None:
    """Export the full graph and one draft graph per draft into OUT_DIR, over one weights file."""
    from pathlib import Path

    from conflayers_runtime.artifact import artifact_section
    from conflayers_runtime.manifest import MANIFEST_NAME, read_manifest

    from .export.build import build_artifact, hand_draft, manifest_for_build
    from .models import load_model

    folder = Path(out_dir)
    hand_given = []
    if skip is not None or draft_precision is not None or draft_vocab is not None:
        hand_given.append(
            hand_draft("manual", _parse_skip(skip or ""), draft_precision or "base", draft_vocab)
        )
    if model is None:
        if not (folder / MANIFEST_NAME).is_file():
            from .errors import ManifestError

            raise ManifestError(
                f"{folder} has no {MANIFEST_NAME} to name the model: run `conflayers-export calibrate "
                f"--out {folder}` first, or pass --model (e.g. --model {DEFAULT_MODEL})"
            )
        model = read_manifest(folder).model.source
    start = time.perf_counter()
    loaded = load_model(model, streamed=True)  # weights read one tensor at a time
    manifest = manifest_for_build(folder, loaded, hand_given, list(skip_sets) or None)
    with ConsoleProgress(quiet).phase(
        f"building {len(manifest.drafts)} draft(s)", len(manifest.drafts) + 3
    ) as step:
        manifest = build_artifact(folder, loaded, manifest, dtype, max_seq_len, lambda name: step())
    seconds = time.perf_counter() - start
    section = artifact_section(manifest)
    files = {name: dataclasses.asdict(entry) for name, entry in section.files.items()}
    result = {
        "folder": str(folder),
        "seconds": seconds,
        "dtype": dtype,
        "drafts": list(section.drafts),
        "files": files,
        "total_bytes": sum(entry.size for entry in section.files.values()),
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"built {folder} in {seconds:.1f} s: full graph + {len(result['drafts'])} draft(s) "
        f"{result['drafts']}, {result['total_bytes'] / 1e6:.1f} MB on disk "
        f"(weights {section.files[section.weights].size / 1e6:.1f} MB)"
    )


def _worst_per_graph(results: Sequence[StepResult]) -> dict[str, StepResult]:
    """Per graph (sorted by name), the step closest to its tolerance (the largest diff / tolerance)."""
    worst: dict[str, StepResult] = {}
    for r in results:
        if r.graph not in worst or r.max_abs_diff * worst[r.graph].tolerance > (
            worst[r.graph].max_abs_diff * r.tolerance
        ):
            worst[r.graph] = r
    return dict(sorted(worst.items()))


@cli.command()
@click.argument("artifact_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--model", default=None, help="PyTorch model to compare with (default: the manifest's source).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="Print every step's result as JSON.")
def validate(artifact_dir: str, model: str | None, device: str, as_json: bool) -> None:
    """Re-check the artifact's file hashes, the parity of every graph with PyTorch, and whether each
    graph computes a position alike in one-token steps, verify passes and prefills (row invariance)."""
    from dataclasses import asdict

    from conflayers_runtime.manifest import read_manifest

    from .export.validate import check_parity, check_row_invariance
    from .models import load_model

    manifest = read_manifest(artifact_dir)
    loaded = load_model(model or manifest.model.source)
    if loaded.identity.fingerprint != manifest.model.fingerprint:
        from .errors import ManifestError

        raise ManifestError(f"{artifact_dir} was built from another model than {loaded.identity.source}")
    results = check_parity(artifact_dir, loaded, device)
    invariance = check_row_invariance(artifact_dir, loaded.model.config.vocab_size, device)
    if as_json:
        report = {
            "parity": [asdict(r) for r in results],
            "row_invariance": [asdict(r) for r in invariance],
            "unknown_manifest_keys": manifest.unknown_keys,
        }
        click.echo(json.dumps(report, indent=2))
        return
    if manifest.unknown_keys:
        click.echo(
            f"note: the manifest (schema {manifest.schema_version}) has fields this version does not read, "
            f"ignored: {', '.join(manifest.unknown_keys)} (a newer conflayers-export uses them)"
        )
    worst = _worst_per_graph(results)
    diffs = ", ".join(
        f"{graph} {r.max_abs_diff:.2e} (tolerance {r.tolerance:.2e})" for graph, r in worst.items()
    )
    click.echo(
        f"ok: hashes match; {len(worst)} graph(s) agree with PyTorch on {len(results)} steps, every argmax "
        f"equal up to near-ties (worst max|diff|: {diffs}; quantized graphs round activations to int8, "
        "so their tolerance is relative to the largest logit)"
    )
    click.echo(f"row invariance on {device}:")
    for r in invariance:
        click.echo(f"  {r.describe()}")
    exact = invariance[0]  # the full graph as the runtime opens it
    if exact.bitwise:
        click.echo("ok: every full-graph pass computes each row bitwise alike: greedy speculation is exact")
    else:
        click.echo(
            click.style(
                f"warning: the full graph's rows differ by up to {exact.max_abs_diff:.2e} between pass "
                f"lengths on {device}: speculative output may differ from plain decoding at near-ties "
                "(DESIGN.md)",
                fg="yellow",
            )
        )


@cli.command()
@click.argument("artifact_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat/--no-chat", default=True, show_default=True, help="Apply the model's chat template.")
@click.option(
    "--mode",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "speculative", "plain"]),
    help="auto: speculative when the manifest recommends it, with a speed guard.",
)
@click.option("--draft", default=None, help="Draft name (default: the manifest's default task).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--tree",
    default=None,
    type=click.IntRange(min=0),
    help="Token trees of N alternative rows (0: a chain; default: as calibrated).",
)
@click.option(
    "--lookup",
    default="calibrated",
    show_default=True,
    type=click.Choice(["calibrated", "on", "off"]),
    help="Proposals read from the text (prompt lookup): as calibrated, on, or off.",
)
@_sampling_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def generate(
    artifact_dir: str,
    prompt: str,
    chat: bool,
    mode: str,
    draft: str | None,
    device: str,
    max_new_tokens: int,
    tree: int | None,
    lookup: str,
    sampling: SamplingConfig,
    as_json: bool,
) -> None:
    """Stream text from a built artifact with ONNX Runtime, then print speed and acceptance."""
    from conflayers_runtime.cli import generate_and_report

    generate_and_report(
        artifact_dir,
        prompt,
        chat=chat,
        mode=mode,
        device=device,
        draft=draft,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        tree=tree,
        lookup=lookup,
        as_json=as_json,
    )


def _parse_genai_ngram(text: str) -> dict[str, int | bool] | None:
    """--genai-ngram "ngram_size=3,max_draft_tokens=8,ngram_chained_lookup=true" -> its
    set_speculative_options keywords (integers, true/false); "none": no n-gram engine."""
    if text.strip().lower() == "none":
        return None
    options: dict[str, int | bool] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        key, sep, value = item.partition("=")
        flag = {"true": True, "false": False}.get(value.strip().lower())
        if not sep or not key.strip() or (flag is None and not value.strip().isdigit()):
            raise click.BadParameter(
                f"{item!r} is not KEY=INTEGER or KEY=true/false, e.g. ngram_size=3",
                param_hint="--genai-ngram",
            )
        options[key.strip()] = flag if flag is not None else int(value)
    return options


@cli.command()
@click.argument("artifact_dir", type=click.Path(file_okay=False, exists=True))
@click.option(
    "--prompts",
    "prompts_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Prompts (.txt, or .jsonl with a 'task' kind per prompt, e.g. examples/prompts/tasks.jsonl); "
    "default: 4 built-in chat prompts.",
)
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=2))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1), help="For every engine.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--no-transformers", is_flag=True, help="Skip the transformers generate baseline.")
@click.option("--no-genai", is_flag=True, help="Skip every onnxruntime-genai engine.")
@click.option(
    "--genai-ngram",
    default=None,
    help="onnxruntime-genai's n-gram engine: its set_speculative_options as KEY=VALUE,... ('none': skip; "
    "default: ngram_size=3,max_draft_tokens=8,ngram_chained_lookup=true,min_adaptive_k=2).",
)
@click.option(
    "--genai-draft-tokens",
    default=None,
    type=click.IntRange(1, 16),
    help="max_draft_tokens of onnxruntime-genai's draft-model engines (default: with our draft the "
    "artifact's, as calibrated; with --genai-draft-model 4).",
)
@click.option(
    "--genai-draft-model",
    default=None,
    help="Also onnxruntime-genai's draft-model mode with its own builds of the model and of this draft "
    "model (a model source sharing the tokenizer, e.g. a smaller model of the same family).",
)
@click.option(
    "--sampled",
    is_flag=True,
    help="Also a run sampling (temperature 0.7, top-p 0.9, fixed seeds) with every engine.",
)
@click.option(
    "--tree",
    "tree_nodes",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Also decode with token trees of this many alternative rows (2 per drafted position).",
)
@click.option(
    "--engine",
    "only",
    multiple=True,
    help="Run only the engines whose names match this shell-style pattern (repeatable, e.g. "
    "'ours spec*' or 'onnxruntime-genai*'), with the plain decodings their ratios need. Default: all.",
)
@click.option(
    "--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write the result here."
)
@click.option(
    "--plot", "plot_out", default=None, type=click.Path(dir_okay=False), help="Write a bar chart here."
)
def bench(
    artifact_dir: str,
    prompts_file: str | None,
    max_new_tokens: int,
    repeats: int,
    threads: int,
    device: str,
    no_transformers: bool,
    no_genai: bool,
    genai_ngram: str | None,
    genai_draft_tokens: int | None,
    genai_draft_model: str | None,
    sampled: bool,
    tree_nodes: int,
    only: tuple[str, ...],
    json_out: str | None,
    plot_out: str | None,
) -> None:
    """Benchmark plain and speculative decoding against transformers and onnxruntime-genai."""
    from pathlib import Path

    from conflayers_runtime import TreeConfig

    from .bench import DEFAULT_PROMPTS, GenaiOptions, load_bench_prompts, plot, run_bench

    prompts = load_bench_prompts(prompts_file) if prompts_file else DEFAULT_PROMPTS
    genai = GenaiOptions(draft_tokens=genai_draft_tokens, draft_model=genai_draft_model)
    if genai_ngram is not None:
        genai = dataclasses.replace(genai, ngram=_parse_genai_ngram(genai_ngram))
    result = run_bench(
        artifact_dir,
        prompts,
        max_new_tokens,
        repeats,
        threads,
        device,
        not no_transformers,
        not no_genai,
        progress=lambda line: click.echo(line, err=True),
        tree=TreeConfig(tree_nodes) if tree_nodes else None,
        genai=genai,
        sampled=sampled,
        only=only,
    )
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    if plot_out:
        plot(result, plot_out)
    click.echo(
        f"{result['model']} {result['dtype']} on {device}, {threads} threads, {len(prompts)} prompts x "
        f"{max_new_tokens} tokens, median of {repeats} (min-max):"
    )
    _echo_engines(result["engines"])
    if "sampled" in result:
        run = result["sampled"]
        click.echo(f"sampled (temperature {run['temperature']}, top-p {run['top_p']}, seeds {run['seeds']}):")
        _echo_engines(run["engines"])


def _echo_engines(engines: dict[str, dict[str, Any]]) -> None:
    """bench's table: each engine's speed, ratios, exactness and acceptance, then tokens/s per task kind."""
    for name, r in engines.items():
        tps = r["decode_tokens_per_s"]
        extra = ""
        if "exact_vs_own_plain" in r:
            exact = r["exact_vs_own_plain"]
            extra += f"  exact {exact['equal']}/{exact['prompts']}"
        if r.get("acceptance_rate"):
            extra += f"  acceptance {r['acceptance_rate']:.2f}"
        if r.get("mean_tokens_per_cycle") and r.get("acceptance_rate"):
            extra += f", {r['mean_tokens_per_cycle']:.2f} tok/pass"
        if "analytic_speedup" in r:
            extra += f", analytic {r['analytic_speedup']:.2f}x, measured {r['measured_speedup']:.2f}x"
        click.echo(
            f"  {name:40s} {tps['median']:6.1f} ({tps['min']:.1f}-{tps['max']:.1f}) tok/s  "
            f"{r['over_ours_plain']:.2f}x plain  "
            f"ttft {r['time_to_first_token_s']['median'] * 1000:.0f} ms{extra}"
        )
    tasks = sorted({task for r in engines.values() for task in r["by_task"]})
    if len(tasks) < 2:
        return
    click.echo("  decode tokens/s per task kind (median):")
    click.echo(f"  {'':40s} " + " ".join(f"{task[:13]:>13s}" for task in tasks))
    for name, r in engines.items():
        cells = [r["by_task"].get(task, {}).get("decode_tokens_per_s", {}).get("median") for task in tasks]
        click.echo(f"  {name:40s} " + " ".join(f"{c:13.1f}" if c else f"{'-':>13s}" for c in cells))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (callable from tests)."""
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except ConflayersError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


if __name__ == "__main__":  # python -m conflayers_export.cli
    sys.exit(main())
