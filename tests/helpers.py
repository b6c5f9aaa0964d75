"""Test helpers: tiny Hugging Face folders, and artifacts built with drafts given as
{name: skip layers} or as Draft objects. ``python -m tests.helpers OUT`` builds the tiny artifact
the runtime-only tests load (scripts/test.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

from conflayers_runtime.manifest import Draft, VocabularyRanking

from conflayers_export.export.build import build_artifact, hand_draft, manifest_for_build

# One draft of each kind: layer skip, int8 weights, and int4 weights with a pruned vocabulary.
DRAFT_KINDS = {
    "skip": [1],
    "int8": Draft("int8", [], weight_precision="int8"),
    "pruned": Draft("pruned", [2], vocab_size=96, weight_precision="int4"),
}


def build(folder, loaded, drafts, max_seq_len=64, ranked=None, **kwargs):
    """``ranked``: the vocabulary ranking pruned drafts are cut from (calibrate's, in a real run)."""
    hand = [d if isinstance(d, Draft) else hand_draft(name, d) for name, d in drafts.items()]
    manifest = manifest_for_build(folder, loaded, hand)
    if ranked is not None:
        manifest.vocabulary = VocabularyRanking(list(ranked))
    return build_artifact(folder, loaded, manifest, max_seq_len=max_seq_len, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """(model, architecture): the architecture's tiny random config, seeded, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from conflayers_export.models.architectures import get_architecture

    architecture = get_architecture(model_type)
    config = architecture.tiny_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval(), architecture


# A ChatML template (SmolLM2's and Qwen's turn markers) for tiny models that chat.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_folder(
    model, folder: Path, max_shard_size: str | None = None, chat_template: str | None = None
) -> Path:
    """Save ``model`` (in safetensors shards of at most ``max_shard_size``) with a word-level
    tokenizer covering its whole vocabulary: letters are ids 0-25, every other id decodes to
    "<id>", so any generated sequence has text (26 doubles as the unknown token); with
    ``chat_template``, the tokenizer has that chat template (its markers tokenize letter by letter)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    vocab = {chr(ord("a") + i): i for i in range(26)}
    vocab |= {f"<{i}>": i for i in range(26, model.config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<26>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<26>")
    fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return folder


def build_tiny_artifact(out: Path) -> None:
    """A tiny random llama (seed 0) that chats in ChatML, with drafts "mid" (layers 1, 2 skipped)
    and "int8"."""
    from conflayers_export.models import load_model

    hf = out.with_name(out.name + "-hf")
    # 2048 positions: room for chat turns (a token a letter) and for streams long enough to drop
    model = tiny_model("llama", max_position_embeddings=2048)[0]
    folder = write_tiny_folder(model, hf, chat_template=CHATML_TEMPLATE)
    drafts = {"mid": [1, 2], "int8": Draft("int8", [], weight_precision="int8")}
    build(out, load_model(str(folder)), drafts, max_seq_len=2048)


if __name__ == "__main__":
    build_tiny_artifact(Path(sys.argv[1]))
