"""What row invariance costs: full-graph pass times by row count, graphs with and without the
attention padding (graph.pad_attention_rows), and the int8-activation int4 graph against the
float-math one it replaces. Interleaved repeats, median, after a 64-token prefill.

    python scripts/bench_pass_rows.py --model smollm2-135m --dtypes fp32,int4 --json rows.json

Variants per dtype: "padded" (as built today), "unpadded" (attention over one row for a one-token
pass, as built before); for int4 also "float-math" (MatMulNBits accuracy_level 0, as the full
graph was built before). Each variant is timed on passes of 1, 2, 3, 5 and 9 rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from conflayers_runtime import read_manifest
from conflayers_runtime.artifact import open_backend

from conflayers_export.export import build as build_module
from conflayers_export.export import graph as graph_module
from conflayers_export.export.build import build_artifact, manifest_for_build
from conflayers_export.models import load_model

ROWS = (1, 2, 3, 5, 9)


def build_variant(loaded, folder: Path, dtype: str, attention_rows: int, accuracy_level: int) -> None:
    """Build with the graph builder's constants of an earlier design (restored afterwards)."""
    saved = graph_module.MIN_ATTENTION_ROWS, graph_module.ACCURACY_LEVEL
    for module in (graph_module, build_module):
        module.MIN_ATTENTION_ROWS, module.ACCURACY_LEVEL = attention_rows, accuracy_level
    try:
        build_artifact(folder, loaded, manifest_for_build(folder, loaded), dtype=dtype, max_seq_len=256)
    finally:
        for module in (graph_module, build_module):
            module.MIN_ATTENTION_ROWS, module.ACCURACY_LEVEL = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="fp32,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    loaded = load_model(args.model)
    report: dict = {"model": args.model, "threads": args.threads, "repeats": args.repeats, "ms": {}}
    with tempfile.TemporaryDirectory(prefix="conflayers-rows-") as tmp:
        backends = {}
        for dtype in args.dtypes.split(","):
            variants = {"padded": (2, 4), "unpadded": (1, 4)}
            if dtype.startswith("int4"):
                variants["float-math"] = (1, 0)
            for name, (attention_rows, level) in variants.items():
                folder = Path(tmp) / f"{dtype}-{name}"
                build_variant(loaded, folder, dtype, attention_rows, level)
                backend = open_backend(folder, read_manifest(folder), threads=args.threads, exact=False)
                backend.forward(list(range(100, 164)), 0, draft=False)
                backends[f"{dtype} {name}"] = backend
        samples: dict[str, list[float]] = {f"{v} {r}": [] for v in backends for r in ROWS}
        for _ in range(args.repeats):  # interleaved: load drift hits every variant alike
            for variant, backend in backends.items():
                for rows in ROWS:
                    start = time.perf_counter()
                    backend.forward([101] * rows, 64, draft=False)
                    samples[f"{variant} {rows}"].append(time.perf_counter() - start)
    for variant in backends:
        report["ms"][variant] = {rows: 1e3 * statistics.median(samples[f"{variant} {rows}"]) for rows in ROWS}
        print(variant, {rows: round(ms, 2) for rows, ms in report["ms"][variant].items()}, flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
