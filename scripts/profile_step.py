"""What one plain decoding step is made of: our full graph against onnxruntime-genai's graph of the
same model and precision, run by one harness (same binding code, same threads), so that the
difference is the graphs' own.

    python scripts/profile_step.py out/ARTIFACT --json step.json

1. Interleaved timing: one-token steps after a 64-token prompt, both graphs taking turns, median.
2. ONNX Runtime's profiler: kernel time per operator type per step, for each graph.
Both graphs read a preallocated cache of max_seq_len positions (past and present bound to one
buffer), as both runtimes run them.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from conflayers_runtime import read_manifest
from conflayers_runtime.artifact import artifact_section

from conflayers_export.bench import genai_model_folder
from conflayers_export.models import cache_dir, load_model

PROMPT = 64  # tokens before the timed steps
STEPS = 128  # timed steps per repeat


class StepHarness:
    """One decoder graph with GroupQueryAttention's interface (input_ids, attention_mask,
    past_key_values.* / present.*), its cache bound in place."""

    def __init__(self, path: Path, threads: int, max_seq_len: int, profile_prefix: str = ""):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.caches = {}
        for tensor in self.session.get_inputs():
            if tensor.name.startswith("past_key_values."):
                heads, head_dim = tensor.shape[1], tensor.shape[3]
                head_dim = head_dim if isinstance(head_dim, int) else _head_dim(path)
                shape = [1, heads, max_seq_len, head_dim]
                self.caches[tensor.name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
        self.outputs = [o.name for o in self.session.get_outputs() if not o.name.startswith("present.")]
        self.binding = self.session.io_binding()

    def step(self, token_ids: list[int], start: int) -> None:
        binding = self.binding
        binding.bind_cpu_input("input_ids", np.asarray([token_ids], np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, start + len(token_ids)), np.int64))
        for name, cache in self.caches.items():
            binding.bind_ortvalue_input(name, cache)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), cache)
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)


def _head_dim(path: Path) -> int:
    config = json.loads((path.parent / "genai_config.json").read_text())
    return int(config["model"]["decoder"]["head_size"])


def interleaved_ms(harnesses: dict[str, StepHarness], repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in harnesses}
    for harness in harnesses.values():
        harness.step(list(range(100, 100 + PROMPT)), 0)
    for _ in range(repeats):  # taking turns: machine drift hits both alike
        for name, harness in harnesses.items():
            for position in range(PROMPT, PROMPT + STEPS):
                started = time.perf_counter()
                harness.step([101], position)
                samples[name].append(time.perf_counter() - started)
    return {name: 1e3 * statistics.median(values) for name, values in samples.items()}


def kernel_us_per_step(path: Path, threads: int, max_seq_len: int, workdir: str) -> dict[str, float]:
    harness = StepHarness(path, threads, max_seq_len, profile_prefix=str(Path(workdir) / path.stem))
    harness.step(list(range(100, 100 + PROMPT)), 0)
    for position in range(PROMPT, PROMPT + STEPS):
        harness.step([101], position)
    events = json.loads(Path(harness.session.end_profiling()).read_text())
    totals: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    steps = STEPS + 1  # the prompt's pass included: its share is small and alike for both graphs
    return {op: round(us / steps, 1) for op, us in totals.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    manifest = read_manifest(args.artifact)
    section = artifact_section(manifest)
    loaded = load_model(manifest.model.source, streamed=True)
    genai_folder = cache_dir() / "genai" / f"{loaded.folder.name}-{section.dtype}"
    genai_model_folder(loaded.folder, genai_folder, args.threads, section.dtype)
    graphs = {"ours": args.artifact / section.full, "onnxruntime-genai": genai_folder / "model.onnx"}
    harnesses = {name: StepHarness(path, args.threads, section.max_seq_len) for name, path in graphs.items()}
    report: dict = {"artifact": str(args.artifact), "dtype": section.dtype, "threads": args.threads}
    report["step_ms"] = interleaved_ms(harnesses, args.repeats)
    del harnesses
    with tempfile.TemporaryDirectory(prefix="conflayers-profile-") as workdir:
        report["kernel_us"] = {
            name: kernel_us_per_step(path, args.threads, section.max_seq_len, workdir)
            for name, path in graphs.items()
        }
    for name, ms in report["step_ms"].items():
        print(f"{name}: {ms:.3f} ms a step (median, interleaved)")
    ops = sorted({op for kernels in report["kernel_us"].values() for op in kernels})
    print(f"{'operator':34s} " + " ".join(f"{name:>18s}" for name in graphs) + "   (us a step, profiler)")
    for op in sorted(ops, key=lambda o: -max(k.get(o, 0) for k in report["kernel_us"].values())):
        print(f"{op:34s} " + " ".join(f"{report['kernel_us'][n].get(op, 0):18.1f}" for n in graphs))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
