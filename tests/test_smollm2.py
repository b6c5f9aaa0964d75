"""End to end on the packaged SmolLM2-135M-Instruct: speculation is exact on a real model."""

from __future__ import annotations

import pytest
import torch

from conflayers_export.models.reference import speculative_generate

pytestmark = pytest.mark.real_model

PROMPTS = [
    "Write a short poem about the sea.",
    "What is 17 times 23? Explain step by step.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Write a Python function that reverses a string.",
]
SKIP_SETS = {
    "none": [],
    "three-middle": [14, 15, 16],
    "twelve": list(range(3, 27, 2)),  # 3, 5, ..., 25: often rejected, exercises rollback
}


@pytest.fixture(scope="module")
def greedy_references(smollm2):
    references = []
    for prompt in PROMPTS:
        ids = smollm2.encode(prompt)
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            # An explicit mask: otherwise generate() masks prompt tokens equal to the pad id (<|im_end|>).
            out = smollm2.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=None,
            )
        references.append((ids, out[0, len(ids) :].tolist()))
    return references


@pytest.mark.parametrize("skip_name", SKIP_SETS)
def test_greedy_speculation_is_token_exact(smollm2, greedy_references, skip_name):
    rejected = 0
    for ids, expected in greedy_references:
        tokens, stats = speculative_generate(
            smollm2.model, smollm2.architecture, ids, SKIP_SETS[skip_name], 64
        )
        assert tokens == expected
        rejected += stats.drafted_tokens - stats.accepted_tokens
    if skip_name == "none":
        assert rejected == 0
    else:
        assert rejected > 0, "this skip set should exercise rollback"
