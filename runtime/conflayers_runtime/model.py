"""The user-facing runtime: load an artifact, generate or stream text.

model = conflayers_runtime.load("artifact/", device="cpu")
for piece in model.stream("Write a haiku.", max_new_tokens=64):
    print(piece, end="")
print(model.last_stats.as_dict())
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from . import chat_template, speculative
from .artifact import artifact_section, open_backend, verify_files
from .errors import GenerationError, ManifestError
from .lookup import LookupConfig
from .manifest import CAPTURABLE_TREE, Manifest, read_manifest
from .onnx_backend import OnnxBackend
from .sampling import SamplingConfig
from .speculative import DraftConfig, GenerationStats
from .tree import TreeConfig

Message = Mapping[str, Any]  # a chat turn: {"role": "user", "content": "..."}

MODES = ("auto", "speculative", "plain")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    seconds: float
    mode: str  # the mode actually used: "speculative" or "plain"

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds else 0.0


class Model:
    """A loaded artifact: tokenizer, full graph and (optionally) one draft, on one device."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        backend: OnnxBackend,
        tokenizer: Tokenizer,
        draft: str | None,
        tree: TreeConfig | None = None,
        lookup: LookupConfig | None = None,
    ):
        self.folder = folder
        self.tree = tree  # token trees in speculative cycles (tree.py), None: a chain
        self.lookup = lookup  # proposals read from the text (lookup.py), alone or with the draft
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.draft = draft
        self.last_stats = GenerationStats()
        self.last_token_ids: list[int] = []
        # Auto mode's speed guard, kept across generations: whether speculation wins on this
        # device with this draft holds for the next prompt too, so a losing draft's probes grow
        # ever rarer instead of starting over with every call.
        self.speed_guard = speculative.SpeedGuard()
        tok = artifact_section(manifest).tokenizer
        self.chat_prefix: str | None = tok.chat_prefix  # artifacts without a template: one user turn
        self.chat_suffix: str | None = tok.chat_suffix
        self.chat_template: str | None = tok.chat_template
        self.special_tokens = chat_template.special_tokens(folder) if tok.chat_template else {}
        self.stop_token_ids: list[int] = list(tok.stop_token_ids)

    @property
    def max_seq_len(self) -> int:
        return self.backend.kv.max_seq_len

    def encode(self, text: str | Sequence[Message], chat: bool = True) -> list[int]:
        """Token ids of a prompt: ``text`` (``chat`` wraps it as one user turn of the model's chat
        template) or chat ``messages`` ({"role", "content"} dicts), with the generation prompt."""
        if not isinstance(text, str):
            return self.tokenizer.encode(self.render_chat(text), add_special_tokens=False).ids
        _check_utf8(text)
        if chat and (self.chat_template is not None or self.chat_prefix is not None):
            return self.encode([{"role": "user", "content": text}])
        return self.tokenizer.encode(text).ids

    def render_chat(self, messages: Sequence[Message]) -> str:
        """The conversation as the model's chat template writes it, ending with the generation
        prompt (as transformers' apply_chat_template); artifacts built before the template was
        carried: a lone user turn between the stored prefix and suffix."""
        if self.chat_template is not None:
            for message in messages if isinstance(messages, Sequence) else ():
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    _check_utf8(message["content"])
            return chat_template.render(self.chat_template, messages, self.special_tokens)
        if self.chat_prefix is None:
            raise GenerationError(
                "this artifact has no chat template: pass a prompt with chat=False, or rebuild it from a "
                "model whose tokenizer has one"
            )
        turns = chat_template.check_messages(messages)
        if len(turns) != 1 or turns[0]["role"] != "user" or not isinstance(turns[0].get("content"), str):
            raise GenerationError(
                "this artifact carries its chat template as one user turn only (built before templates were "
                "carried): pass one user message, or rebuild the artifact for multi-turn chat"
            )
        _check_utf8(turns[0]["content"])
        return f"{self.chat_prefix}{turns[0]['content']}{self.chat_suffix}"

    def room(self, prompt_tokens: int) -> int:
        """How many new tokens fit after a prompt of ``prompt_tokens``: the last full pass starts at
        prompt + max_new_tokens - 2 and needs room for its rows."""
        return self.max_seq_len - max(0, self.backend.full_pass_rows - 2) - prompt_tokens

    def draft_config(self) -> DraftConfig:
        """The loaded draft's calibrated draft length, where the manifest has one, else the defaults."""
        if self.draft is None:
            return speculative.DEFAULT_DRAFT_CONFIG
        d, default = self.manifest.draft(self.draft), speculative.DEFAULT_DRAFT_CONFIG
        return DraftConfig(
            d.max_draft_tokens or default.max_draft_tokens,
            default.confidence_threshold if d.confidence_threshold is None else d.confidence_threshold,
        )

    def resolve_mode(self, mode: str) -> str:
        """'auto' follows the manifest: speculative where the chosen draft is recommended or a
        lookup is configured (calibrate ships one only where it pays), else plain."""
        if mode not in MODES:
            raise GenerationError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        if mode == "speculative" and self.draft is None and self.lookup is None:
            raise GenerationError(
                "speculative mode needs a draft or a lookup: this artifact was loaded with neither"
            )
        if mode == "auto":
            recommended = self.draft is not None and self.manifest.draft(self.draft).recommended
            return "speculative" if recommended or self.lookup is not None else "plain"
        return mode

    def stream(
        self,
        prompt: str | Sequence[int] | None = None,
        max_new_tokens: int = 128,
        *,
        messages: Sequence[Message] | None = None,
        chat: bool = True,
        sampling: SamplingConfig = speculative.GREEDY,
        mode: str = "auto",
        draft_config: DraftConfig | None = None,
        stop_strings: Sequence[str] = (),
        guard: bool = True,
    ) -> Iterator[str]:
        """Yield text pieces as they are decided. Stats of the run land in ``self.last_stats``.
        The prompt is text, token ids, or chat ``messages`` (rendered with the model's chat template).
        ``draft_config`` None: the draft length calibrated for the loaded draft (:meth:`draft_config`).
        ``stop_strings``: the text ends where the first of them begins (text that may be the start
        of one is held back until the next piece tells)."""
        if (prompt is None) == (messages is None):
            raise GenerationError("pass either a prompt or messages")
        if messages is not None:
            ids = self.encode(messages)
        else:
            ids = self.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
        if max_new_tokens > self.room(len(ids)):
            reserved = max(0, self.backend.full_pass_rows - 2)
            padding = f" less {reserved} padding rows of exact decoding" if reserved else ""
            raise GenerationError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the artifact's "
                f"max_seq_len {self.max_seq_len}{padding}: shorten them or rebuild with a larger "
                "--max-seq-len"
            )
        used = self.resolve_mode(mode)
        policy = self.speed_guard if guard and used == "speculative" and mode == "auto" else None
        self.last_stats = GenerationStats()
        self.last_token_ids = []
        text = _Detokenizer(self.tokenizer, self.last_token_ids)
        stops = [stop for stop in stop_strings if stop]
        held = ""  # decided text not yet yielded: it may be the start of a stop string
        for chunk in speculative.stream(
            self.backend,
            ids,
            max_new_tokens,
            sampling,
            (draft_config or self.draft_config()) if used == "speculative" and self.draft else None,
            self.stop_token_ids,
            self.last_stats,
            policy,
            self.tree if used == "speculative" else None,
            self.lookup if used == "speculative" else None,
        ):
            piece = text.add(chunk)
            if piece is None:  # an incomplete UTF-8 sequence: wait for its next bytes
                continue
            if stops:
                window = held + piece
                cut = _first_stop(window, stops)
                if cut is not None:
                    if cut:
                        yield window[:cut]
                    return
                held_back = _stop_prefix_length(window, stops)
                piece, held = window[: len(window) - held_back], window[len(window) - held_back :]
            if piece:
                yield piece
        if held:
            yield held

    def generate(
        self, prompt: str | Sequence[int] | None = None, max_new_tokens: int = 128, **kwargs: object
    ) -> GenerationResult:
        """Generate to the end (the arguments of :meth:`stream`, ``messages=`` included); returns
        text, token ids, stats and wall time."""
        start = time.perf_counter()
        text = "".join(self.stream(prompt, max_new_tokens, **kwargs))  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        mode = self.resolve_mode(str(kwargs.get("mode", "auto")))
        return GenerationResult(text, list(self.last_token_ids), self.last_stats, seconds, mode)


class _Detokenizer:
    """Incremental decoding in O(chunk) per step: decode the new tokens with one earlier chunk of
    left context (a slice that starts mid-text can lose a leading space) and emit the difference."""

    def __init__(self, tokenizer: Tokenizer, tokens: list[int]):
        self.tokenizer = tokenizer
        self.tokens = tokens  # shared with the caller, which reads the ids
        self.prefix = 0  # start of the context slice
        self.read = 0  # tokens whose text has been emitted

    def add(self, chunk: Sequence[int]) -> str | None:
        self.tokens.extend(chunk)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.tokens[self.prefix :], skip_special_tokens=True)
        if after.endswith("\ufffd"):
            return None
        piece = after[len(before) :]
        # A chunk that decodes to nothing (special tokens) is no context: the next chunk's leading
        # space would be lost, so the context keeps the text before it.
        if piece:
            self.prefix = self.read
        self.read = len(self.tokens)
        return piece


def _first_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, None if none does."""
    hits = [at for at in (text.find(stop) for stop in stop_strings) if at >= 0]
    return min(hits) if hits else None


def _stop_prefix_length(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (0: none does)."""
    longest = min(len(text), max(len(stop) for stop in stop_strings) - 1)
    for length in range(longest, 0, -1):
        if any(stop.startswith(text[-length:]) for stop in stop_strings):
            return length
    return 0


def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # e.g. undecodable command-line bytes (surrogate escapes)
        raise GenerationError(
            f"the prompt is not valid UTF-8 text (bad character at position {exc.start}): "
            "pass UTF-8 text, or token ids"
        ) from None


class _DefaultTaskDraft:
    """Type of DEFAULT_TASK_DRAFT: a sentinel, since a draft may well be named "default"."""

    def __repr__(self) -> str:
        return "DEFAULT_TASK_DRAFT"


DEFAULT_TASK_DRAFT = _DefaultTaskDraft()


def default_draft(manifest: Manifest) -> str | None:
    """The built draft of the manifest's ``default`` task, else the first built draft, else None."""
    task = manifest.tasks.get("default")
    built = list(artifact_section(manifest).drafts)
    return task.draft if task is not None and task.draft in built else (built[0] if built else None)


def loaded_by_default(manifest: Manifest) -> str | None:
    """The draft ``load()`` opens when none is named: :func:`default_draft`, unless calibration did
    not recommend it (auto would decode plainly anyway; a lone session also decodes faster, its
    threads may spin between runs, and takes half the memory) and the default task does not use
    it beside a lookup. Name the draft to force it."""
    draft = default_draft(manifest)
    task = manifest.tasks.get("default")
    if draft is None or (task is not None and task.source == "lookup"):  # the lookup alone won
        return None
    with_lookup = task is not None and task.source == "both" and task.draft == draft
    return draft if manifest.draft(draft).recommended or with_lookup else None


def calibrated_lookup(manifest: Manifest) -> LookupConfig | None:
    """The lookup calibrate shipped for the ``default`` task (Task.lookup), if any."""
    task = manifest.tasks.get("default")
    if task is None or task.lookup is None:
        return None
    return LookupConfig(task.lookup.min_ngram, task.lookup.max_ngram, task.lookup.max_draft_tokens)


def calibrated_tree(
    manifest: Manifest, draft: str | None, device: str, capturable: bool | None
) -> TreeConfig | None:
    """The token tree calibrate chose for ``draft`` (Draft.tree_nodes / tree_width), where the
    artifact has the tree graph in the form the session takes: captured (CUDA's default where
    the artifact has capturable graphs) or not."""
    if draft is None:
        return None
    d, section = manifest.draft(draft), artifact_section(manifest)
    captured = capturable or (capturable is None and device == "cuda" and "full" in section.capturable)
    has_graph = CAPTURABLE_TREE in section.capturable if captured else draft in section.tree
    if d.tree_nodes is None or d.tree_width is None or not has_graph:
        return None
    return TreeConfig(d.tree_nodes, d.tree_width)


def load(
    folder: str | os.PathLike[str],
    device: str = "cpu",
    draft: str | None | _DefaultTaskDraft = DEFAULT_TASK_DRAFT,
    threads: int | None = None,
    weights: str | None = None,
    verify: bool = True,
    exact: bool = True,
    capturable: bool | None = None,
    tree: bool | TreeConfig | None = None,
    lookup: bool | LookupConfig | None = None,
) -> Model:
    """Open an artifact built by ``conflayers-export build``.

    ``draft``: a draft name, ``DEFAULT_TASK_DRAFT`` (the draft of the manifest's ``default`` task, else the
    first built draft, unless calibration did not recommend it) or None (plain decoding only).
    ``weights`` (artifact.WEIGHT_MODES): None is "paired" on the CPU where the artifact has a
    paired graph for the draft, else "prepacked". ``verify`` checks every file's sha256 first.
    ``exact`` (default) makes greedy speculative output bitwise equal to plain output: every
    full-model pass then has at least the device's row-invariant row count
    (artifact.full_pass_rows; 1 on the CPU for graphs that pad their attention themselves, 16
    on CUDA); False turns that padding off. ``capturable``: run the capturable graphs, in CUDA
    graphs on CUDA (the default there, where the artifact has them; artifact.open_backend).
    ``tree``: verify passes hold a token tree (True: TreeConfig's defaults; tree.py: the same
    output, more proposals accepted per full pass), through the artifact's tree graphs; None: as
    calibrated for the draft (:func:`calibrated_tree`), False: a chain. ``lookup``: proposals read
    from the text (lookup.py), alone or beside the draft (True: LookupConfig's defaults); None: as
    calibrated for the default task (:func:`calibrated_lookup`), False: none.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    section = artifact_section(manifest)
    if verify:
        verify_files(folder, manifest)
    if isinstance(draft, _DefaultTaskDraft):
        draft = loaded_by_default(manifest)
    if tree is None:
        tree = calibrated_tree(manifest, draft, device, capturable) or False
    backend = open_backend(folder, manifest, draft, device, threads, weights, exact, capturable, bool(tree))
    tokenizer_file = folder / section.tokenizer.file
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise ManifestError(
            f"cannot read the tokenizer {tokenizer_file} ({exc}); rebuild the artifact"
        ) from exc
    tree_config = TreeConfig() if tree is True else (tree or None)
    if lookup is None:
        lookup = calibrated_lookup(manifest)
    lookup_config = LookupConfig() if lookup is True else (lookup or None)
    return Model(folder, manifest, backend, tokenizer, draft, tree_config, lookup_config)
