"""Behaviour of the decoding loop the other tests do not pin down: a speed guard that switches
drafting on and off mid-generation, and text streamed across incomplete UTF-8 sequences."""

from __future__ import annotations

import pytest
from conflayers_runtime import DraftConfig, SpeedGuard, generate, load, stream
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.manifest import read_manifest
from conflayers_runtime.model import _Detokenizer
from tokenizers import Tokenizer

from conflayers_export.models import load_model
from tests.helpers import build


class Alternating(SpeedGuard):
    """A guard that drafts every other cycle, whatever the timings say."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def allow_draft(self) -> bool:
        self.calls += 1
        return self.calls % 2 == 0


@pytest.fixture(scope="module")
def artifact(tiny_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loop") / "artifact"
    build(folder, load_model(str(tiny_folder("qwen3"))), {"mid": [1, 2]}, max_seq_len=128)
    return folder


def test_a_guard_switching_drafting_on_and_off_keeps_plain_output(artifact):
    manifest = read_manifest(artifact)
    prompt = [5, 17, 3, 9, 10]
    plain, _ = generate(open_backend(artifact, manifest), prompt, 60, draft_config=None)
    backend = open_backend(artifact, manifest, "mid")
    guard = Alternating()
    chunks = list(stream(backend, prompt, 60, draft_config=DraftConfig(4, 0.0), guard=guard))
    assert [t for chunk in chunks for t in chunk] == plain
    assert guard.calls > 10 and any(len(c) > 1 for c in chunks)  # both kinds of cycle ran
    # The model's auto mode, with the real guard, gives the same text too.
    assert load(artifact, draft="mid").generate(prompt, 60, mode="auto").token_ids == plain


def test_auto_mode_keeps_one_speed_guard_across_generations(artifact):
    """A draft measured slower stays measured slower for the next prompt: the guard's state (its
    waits between probes) carries over instead of starting again at every call."""
    model = load(artifact, draft="mid")
    model.speed_guard = guard = Alternating()
    model.generate([5, 17, 3, 9, 10], 20, mode="auto")
    first = guard.calls
    model.generate([7, 1, 4], 20, mode="auto")
    second = guard.calls
    assert first > 0 and second > first
    model.generate([7, 1, 4], 20, mode="speculative")  # forced speculation bypasses the guard
    model.generate([7, 1, 4], 20, mode="auto", guard=False)
    assert guard.calls == second


@pytest.mark.real_model
def test_text_streams_whole_characters_across_byte_tokens(smollm2):
    """A byte-level BPE splits an emoji over several tokens; no piece may end mid-character."""
    tokenizer = Tokenizer.from_str(smollm2.tokenizer.backend_tokenizer.to_str())
    text = "Caf\u00e9 \u9f98 ok \U0001d518 \ua66e!"  # its 3 rare characters: 3 byte tokens each
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # the test needs characters spread over several tokens
    emitted: list[int] = []
    detokenizer = _Detokenizer(tokenizer, emitted)
    pieces = [detokenizer.add([token]) for token in ids]
    assert None in pieces  # some token ended mid-character and was held back
    assert "".join(p for p in pieces if p is not None) == text
    assert not any("\ufffd" in p for p in pieces if p is not None)


def test_a_chunk_of_special_tokens_keeps_the_next_chunks_leading_space():
    """A chunk that decodes to nothing (a special token) is no left context: the next chunk,
    decoded after it alone, would lose the space that joins it to the text before."""
    from tokenizers import AddedToken, models

    tokenizer = Tokenizer(models.WordLevel({"one": 0, "two": 1, "<unk>": 2}, unk_token="<unk>"))
    tokenizer.add_special_tokens([AddedToken("<sep>", special=True)])  # id 3
    whole = tokenizer.decode([0, 3, 1], skip_special_tokens=True)
    assert whole == "one two"  # the test needs a decoder that joins words with spaces
    for chunks in ([[0], [3], [1]], [[0, 3], [1]], [[0], [3, 1]]):
        detokenizer = _Detokenizer(tokenizer, [])
        assert "".join(detokenizer.add(chunk) for chunk in chunks) == whole, chunks
