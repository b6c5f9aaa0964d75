"""``conflayers-run``: generate from a built artifact without the exporter (or torch) installed.

conflayers-run ARTIFACT --prompt "Write a haiku." [--mode auto|speculative|plain] [--json]
conflayers-run profile ARTIFACT --device cpu|cuda [--threads N] --out costs.json  (costs.py)
conflayers-run serve ARTIFACT [--host 127.0.0.1] [--port 8000] [--api-key KEY]  (serve.py: OpenAI's API)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from .costs import CostTable, profile, write_cost_table
from .errors import ConflayersError, GenerationError
from .manifest import read_manifest
from .model import DEFAULT_TASK_DRAFT, MODES, Model, default_draft, load
from .sampling import SamplingConfig
from .speculative import GenerationStats
from .tree import TreeConfig


def acceptance_text(rate: float, speculative: bool) -> str:
    """The rate to two decimals, or "n/a" for plain decoding (nothing is drafted, so no rate)."""
    return f"{rate:.2f}" if speculative else "n/a"


def token_sources(stats: GenerationStats) -> tuple[int, int]:
    """(speculative, plain): how many of the emitted tokens came from cycles that drafted and how
    many from plain full-model steps (the prefill's token included). They add up to ``new_tokens``.

    A cycle that drafted emits its accepted drafts plus the full model's own token; every other
    token came from a plain step (in mode "auto" the speed guard decodes some stretches plainly,
    and the last token of a run may have no room left to draft).
    """
    after_prefill = stats.new_tokens - stats.prefill_passes  # each prefill emits one token
    # min(): a stop token may cut the last cycle short of accepted + 1 tokens
    speculative = max(0, min(stats.accepted_tokens + stats.cycles, after_prefill))
    return speculative, stats.new_tokens - speculative


# --lookup: load()'s lookup argument for each choice.
LOOKUP_CHOICES: dict[str, bool | None] = {"calibrated": None, "on": True, "off": False}


def _sources(model: Model) -> str:
    """What proposes in the model's speculative cycles, in words."""
    draft = f"draft {model.draft}" if model.draft is not None else ""
    lookup = "lookup" if model.lookup is not None else ""
    return " + ".join(part for part in (draft, lookup) if part)


def _label(used: str, requested: str, sources: str, speculative: int, plain: int) -> str:
    """The summary line's label: which tokens came from speculative cycles and which from plain steps."""
    if used != "speculative":
        return "[plain]"
    return (
        f"[{requested}: {speculative} tokens from speculative cycles with {sources}, "
        f"{plain} from plain steps]"
    )


def generate_and_report(
    folder: str,
    prompt: str,
    *,
    chat: bool = True,
    mode: str = "auto",
    device: str = "cpu",
    max_new_tokens: int = 128,
    sampling: SamplingConfig | None = None,
    threads: int | None = None,
    draft: str | None = None,
    tree: int | None = None,
    lookup: str = "calibrated",
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> dict[str, object]:
    """Stream the answer to ``out`` (or print JSON), then the speed and acceptance to ``err``.
    ``tree``: token trees of that many alternative rows (0: a chain; None: as calibrated).
    ``lookup`` (LOOKUP_CHOICES): proposals read from the text as calibrated, with the runtime's
    defaults ("on"), or none ("off")."""
    import time

    out, err = out or sys.stdout, err or sys.stderr  # looked up per call (tests replace them)
    if draft is None and mode == "speculative":  # forced: use the default draft even if not recommended
        draft = default_draft(read_manifest(folder))
    trees = None if tree is None else (TreeConfig(tree) if tree else False)
    if lookup not in LOOKUP_CHOICES:
        raise GenerationError(f"unknown lookup {lookup!r}: use one of {', '.join(LOOKUP_CHOICES)}")
    model = load(
        folder,
        device=device,
        threads=threads,
        draft=draft or DEFAULT_TASK_DRAFT,
        tree=trees,
        lookup=LOOKUP_CHOICES[lookup],
    )
    used = model.resolve_mode(mode)
    start = time.perf_counter()
    pieces = []
    sampling = sampling or SamplingConfig()
    for piece in model.stream(prompt, max_new_tokens, chat=chat, sampling=sampling, mode=mode):
        pieces.append(piece)
        if not as_json:
            out.write(piece)
            out.flush()
    seconds = time.perf_counter() - start
    stats = model.last_stats
    speculative_tokens, plain_tokens = token_sources(stats)
    result = {
        "text": "".join(pieces),
        "mode": used,
        "draft": model.draft if used == "speculative" else None,
        "lookup": used == "speculative" and model.lookup is not None,
        "device": device,
        "seconds": seconds,
        "tokens_per_second": stats.new_tokens / seconds,
        "speculative_tokens": speculative_tokens,
        "plain_tokens": plain_tokens,
        **stats.as_dict(),
    }
    if as_json:
        out.write(json.dumps(result, indent=2) + "\n")
    else:
        out.write("\n")
        err.write(
            f"{_label(used, mode, _sources(model), speculative_tokens, plain_tokens)} "
            f"{stats.new_tokens} tokens in {seconds:.2f} s ({result['tokens_per_second']:.1f} tok/s); "
            f"acceptance {acceptance_text(stats.acceptance_rate, used == 'speculative')}, "
            f"{stats.mean_tokens_per_cycle:.2f} tokens per full-model pass\n"
        )
    return result


def describe_costs(table: CostTable) -> list[str]:
    """The cost table in words: the step, the verify passes, the fitted model and its error per draft."""
    verify = ", ".join(f"{rows}: {cost:.2f}" for rows, cost in table.verify.items())
    lines = [
        f"{table.model_source} {table.artifact_dtype} on {table.device} (onnxruntime {table.onnxruntime}, "
        f"{table.threads or 'default'} threads): step {table.step_seconds * 1000:.2f} ms",
        f"verify pass / step by rows: {verify}",
        "draft pass / step = fixed + kept layers x per layer + vocabulary columns x per column:",
        *(
            f"  {precision}: {c.fixed:.4f} + layers x {c.per_layer:.5f} + columns x {c.per_column:.3e}"
            for precision, c in table.coefficients.items()
        ),
        f"  {'draft':24s} {'layers':>6s} {'columns':>7s} {'measured':>8s} {'fitted':>8s} {'error':>7s} "
        f"{'held out':>8s}",
    ]
    for t in table.drafts:
        held_out = f"{t.held_out_error:+8.1%}" if t.held_out_error is not None else f"{'-':>8s}"
        lines.append(
            f"  {t.name:24s} {t.kept_layers:6d} {t.columns:7d} {t.measured:8.3f} {t.predicted:8.3f} "
            f"{t.error:+7.1%} {held_out}"
        )
    worst = table.max_held_out_error
    lines.append(
        f"fit error: at most {table.max_error:.1%} on the drafts fitted"
        + (f", {worst:.1%} predicting a draft left out of the fit" if worst is not None else "")
    )
    return lines


def profile_main(argv: Sequence[str]) -> int:
    """``conflayers-run profile``: time the artifact's passes here and write the cost table."""
    parser = argparse.ArgumentParser(
        prog="conflayers-run profile",
        description="Time an artifact's full step, verify passes and drafts on this device and write "
        "the cost table that `conflayers-export calibrate --costs` reads.",
    )
    parser.add_argument("artifact", help="a profiling artifact (calibrate --stage profile-artifact)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=15, help="each pass's time is its fastest repeat")
    parser.add_argument("--out", required=True, help="the cost table (JSON) to write")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    try:
        table = profile(args.artifact, args.device, args.threads, args.repeats)
        write_cost_table(table, args.out)
    except ConflayersError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write("\n".join([*describe_costs(table), f"wrote {args.out}"]) + "\n")
    return 0


def serve_main(argv: Sequence[str]) -> int:
    """``conflayers-run serve``: an OpenAI-compatible HTTP server for the artifact, until interrupted."""
    parser = argparse.ArgumentParser(
        prog="conflayers-run serve",
        description="Serve an artifact over OpenAI's API: /v1/chat/completions, /v1/completions, "
        "/v1/models, /health. One request decodes at a time, in arrival order.",
    )
    parser.add_argument("artifact", help="folder written by `conflayers-export build`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--draft", default=None, help="draft name (default: the manifest's default task)")
    parser.add_argument("--api-key", default=None, help="demand `Authorization: Bearer KEY`")
    parser.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get a 429")
    parser.add_argument(
        "--max-tokens-cap", type=int, default=None, help="largest max_tokens a request may ask for"
    )
    args = parser.parse_args(argv)
    for name in ("max_queue", "max_tokens_cap"):
        if getattr(args, name) is not None and getattr(args, name) < (0 if name == "max_queue" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    from .serve import Limits, serve

    try:
        limits = Limits(args.max_queue, args.max_tokens_cap, args.api_key)
        serve(args.artifact, args.host, args.port, device=args.device, threads=args.threads,
              draft=args.draft, limits=limits)
    except ConflayersError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["profile"]:  # an artifact folder named "profile" is ./profile
        return profile_main(argv[1:])
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="conflayers-run",
        description=__doc__.splitlines()[0],
        epilog="conflayers-run profile --help: time an artifact's passes here for calibrate --costs; "
        "conflayers-run serve --help: serve it over OpenAI's API",
    )
    parser.add_argument("artifact", help="folder written by `conflayers-export build`")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--mode", choices=MODES, default="auto")
    parser.add_argument("--draft", default=None, help="draft name (default: the manifest's default task)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--tree",
        type=int,
        default=None,
        help="token trees of N alternative rows (0: a chain; default: as calibrated)",
    )
    parser.add_argument(
        "--lookup",
        choices=list(LOOKUP_CHOICES),
        default="calibrated",
        help="proposals read from the text: as calibrated (default), on, or off",
    )
    parser.add_argument("--json", action="store_true", dest="as_json")
    args = parser.parse_args(argv)
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
        generate_and_report(
            args.artifact,
            args.prompt,
            chat=args.chat,
            mode=args.mode,
            device=args.device,
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
            threads=args.threads,
            draft=args.draft,
            tree=args.tree,
            lookup=args.lookup,
            as_json=args.as_json,
        )
    except ConflayersError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
