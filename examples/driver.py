"""A minimal driver of a conflayers artifact: numpy + onnxruntime only, from manifest.json alone.

Greedy self-speculative decoding with a fixed draft length: the draft graph proposes K tokens,
the full graph verifies them in one pass, and the longest agreeing prefix plus one token of the
full model is kept. The output is exactly the full model's greedy output. It shows the whole
contract a driver in another language needs:
- one KV buffer per layer [1, kv_heads, max_seq_len, head_dim], bound as past AND present;
- attention_mask = ones of length (cached + new tokens): this is how the graph knows where to
  write; rolling back a rejected draft is just using a shorter mask next time;
- the draft graph takes only the KV buffers of the layers it keeps (its input names say which);
- a draft with a pruned vocabulary scores only some tokens: column j of its logits is token
  ids[j], with ids an int64 tensor of weights.bin named in manifest artifacts.draft_vocab;
- every full-graph pass here has at least two rows (the prompt of two or more tokens, verify
  passes of K+1): ONNX Runtime computes a one-row pass through other kernels, whose last bits
  differ, so a driver that also runs one-token full steps must pad them (DESIGN.md, row
  invariance) to produce what the runtime package produces.

    python examples/driver.py ARTIFACT_DIR 1,2,3 --draft NAME --new-tokens 32
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


class Pair:
    def __init__(self, folder: Path, draft_name: str):
        manifest = json.loads((folder / "manifest.json").read_text())
        art = manifest["artifacts"]
        kv = art["kv"]
        dtype = np.float16 if kv.get("dtype", art["dtype"]) == "fp16" else np.float32
        shape = (1, kv["num_kv_heads"], art["max_seq_len"], kv["head_dim"])
        self.max_seq_len = art["max_seq_len"]
        # One OrtValue per layer and kind, shared by both sessions.
        self.cache = {
            f"{i}.{kind}": ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))
            for i in range(kv["num_layers"])
            for kind in ("key", "value")
        }
        self.full = ort.InferenceSession(str(folder / art["full"]))
        self.draft = ort.InferenceSession(str(folder / art["drafts"][draft_name]))
        self.draft_ids = None  # draft logits column -> token id (None: the whole vocabulary)
        if draft_name in art.get("draft_vocab", {}):
            _, shape, offset, _ = art["weights_index"][art["draft_vocab"][draft_name]]
            self.draft_ids = np.fromfile(folder / art["weights"], np.int64, shape[0], offset=offset)

    def run(self, session: ort.InferenceSession, tokens: list[int], start: int) -> np.ndarray:
        """Logits [len(tokens), vocab] for tokens placed at positions start.. of the cache."""
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.array([tokens], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, start + len(tokens)), dtype=np.int64))
        binding.bind_output("logits")
        for node in session.get_inputs():
            if node.name.startswith("past_key_values."):
                layer_kind = node.name[len("past_key_values.") :]
                binding.bind_ortvalue_input(node.name, self.cache[layer_kind])
                binding.bind_ortvalue_output("present." + layer_kind, self.cache[layer_kind])
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[0]


def speculative_greedy(pair: Pair, prompt: list[int], new_tokens: int, k: int = 4) -> list[int]:
    if len(prompt) + new_tokens + k > pair.max_seq_len:
        raise SystemExit(f"prompt + new tokens exceed the artifact's max_seq_len {pair.max_seq_len}")
    pending = int(pair.run(pair.full, prompt, 0)[-1].argmax())  # prefill
    cached, out = len(prompt), [pending]
    while len(out) < new_tokens:
        drafted, token = [], pending
        for position in range(cached, cached + k):  # draft: one token at a time
            token = int(pair.run(pair.draft, [token], position)[-1].argmax())
            token = token if pair.draft_ids is None else int(pair.draft_ids[token])
            drafted.append(token)
        targets = pair.run(pair.full, [pending, *drafted], cached).argmax(-1)  # verify: one pass
        accepted = 0
        while accepted < k and drafted[accepted] == targets[accepted]:
            accepted += 1
        out += [*drafted[:accepted], int(targets[accepted])]
        cached += accepted + 1  # positions past this are stale and will be overwritten
        pending = out[-1]
    return out[:new_tokens]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("prompt_ids", help="comma-separated token ids")
    parser.add_argument("--draft", required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    ids = [int(t) for t in args.prompt_ids.split(",")]
    print(json.dumps(speculative_greedy(Pair(args.artifact, args.draft), ids, args.new_tokens)))
