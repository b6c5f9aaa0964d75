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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnxruntime as ort
from conflayers_runtime import read_manifest
from conflayers_runtime.artifact import kv_spec, session_options
from conflayers_runtime.onnx_backend import OnnxBackend

from conflayers_export.export import build as build_module
from conflayers_export.export import graph as graph_module
from conflayers_export.export.build import build_artifact, manifest_for_build
from conflayers_export.models import load_model

ROWS = (1, 2, 3, 5, 9)


@contextmanager
def builder_constants(attention_rows: int, accuracy_level: int) -> Iterator[None]:
    """Build graphs of an earlier design inside this block: the graph builder's attention padding
    (graph.MIN_ATTENTION_ROWS) and MatMulNBits accuracy level set as given, restored afterwards."""
    saved = graph_module.MIN_ATTENTION_ROWS, graph_module.ACCURACY_LEVEL
    graph_module.MIN_ATTENTION_ROWS = attention_rows  # graph.min_attention_rows reads it (CPU dtypes)
    for module in (graph_module, build_module):
        module.ACCURACY_LEVEL = accuracy_level
    try:
        yield
    finally:
        graph_module.MIN_ATTENTION_ROWS = saved[0]
        for module in (graph_module, build_module):
            module.ACCURACY_LEVEL = saved[1]


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
                with builder_constants(attention_rows, level):
                    build_artifact(
                        folder, loaded, manifest_for_build(folder, loaded), dtype=dtype, max_seq_len=256
                    )
                # Spinning stopped after each run, as for a session pair: otherwise the idle
                # sessions' thread pools spin and take the cores from the one being timed.
                options = session_options(args.threads, two_sessions=True)
                session = ort.InferenceSession(
                    str(folder / "full.onnx"), options, providers=["CPUExecutionProvider"]
                )
                backend = OnnxBackend(session, None, kv_spec(read_manifest(folder)))
                backend.forward(list(range(100, 164)), 0, use_draft=False)
                backends[f"{dtype} {name}"] = backend
        samples: dict[str, list[float]] = {f"{v} {r}": [] for v in backends for r in ROWS}
        for _ in range(args.repeats):  # interleaved: load drift hits every variant alike
            for variant, backend in backends.items():
                for rows in ROWS:
                    start = time.perf_counter()
                    backend.forward([101] * rows, 64, use_draft=False)
                    samples[f"{variant} {rows}"].append(time.perf_counter() - start)
    for variant in backends:
        report["ms"][variant] = {rows: 1e3 * statistics.median(samples[f"{variant} {rows}"]) for rows in ROWS}
        print(variant, {rows: round(ms, 2) for rows, ms in report["ms"][variant].items()}, flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
