"""The ``conflayers-export`` command line: a thin click layer over the library.

Heavy modules (torch, transformers) are imported inside the commands so ``--help`` is instant.
Library errors (:class:`ConflayersError`) become one red line and exit code 1.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence

import click
from conflayers_runtime.errors import ConflayersError, SkipSetError

DEFAULT_MODEL = "smollm2-135m"


def _parse_layers(value: str) -> list[int]:
    if not value.strip():
        return []
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SkipSetError(
            f"--skip takes comma-separated layer indices such as 3,7,11; got {value!r}"
        ) from None


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
@click.option("--skip", default="", help="Layers the draft skips, e.g. 14,15,16 (empty: draft = full model).")
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
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def reference(
    model: str,
    prompt: str,
    skip: str,
    chat: bool,
    plain: bool,
    max_new_tokens: int,
    max_draft: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    as_json: bool,
) -> None:
    """Generate with the PyTorch reference self-speculative decoder and print text and stats."""
    from conflayers_runtime import DraftConfig, SamplingConfig

    from .models import load_model
    from .reference import speculative_generate

    skip_layers = _parse_layers(skip)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
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
        f"({result['tokens_per_second']:.1f} tok/s); acceptance {stats.acceptance_rate:.2f}, "
        f"{stats.mean_tokens_per_cycle:.2f} tokens per full-model pass, "
        f"accepted-length histogram {stats.accepted_histogram}",
        err=True,
    )


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


if __name__ == "__main__":
    sys.exit(main())
