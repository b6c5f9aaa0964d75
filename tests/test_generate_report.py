"""What `conflayers-run` / `generate` tells a user: which tokens came from speculative
cycles and which from plain steps, in the JSON result and in the summary line."""

from __future__ import annotations

import io
import json
import re

import pytest
from conflayers_runtime import GenerationStats
from conflayers_runtime.cli import generate_and_report, token_sources

from conflayers_export.models import load_model
from tests.helpers import build


@pytest.fixture(scope="module")
def tiny_artifact(tiny_folder, tmp_path_factory):
    artifact = tmp_path_factory.mktemp("report") / "artifact"
    build(artifact, load_model(str(tiny_folder("qwen2"))), {"mid": [1, 2]})
    return artifact


def run(artifact, mode: str, as_json: bool) -> tuple[dict[str, object], str, str]:
    out, err = io.StringIO(), io.StringIO()
    result = generate_and_report(
        str(artifact), "abc", chat=False, mode=mode, max_new_tokens=24, as_json=as_json, out=out, err=err
    )
    return result, out.getvalue(), err.getvalue()


def test_token_sources_on_hand_worked_stats():
    # prefill (1) + 2 plain steps (2) + drafted cycles accepting 3 and 1 (4 + 2) = 9 tokens
    stats = GenerationStats(new_tokens=9, cycles=2, accepted_tokens=4, prefill_passes=1)
    assert token_sources(stats) == (6, 3)
    assert token_sources(GenerationStats(new_tokens=5, prefill_passes=1, verify_passes=4)) == (0, 5)
    # a stop token cut the only drafted cycle after 2 of its 5 tokens: never a negative plain count
    cut = GenerationStats(new_tokens=3, cycles=1, accepted_tokens=4, prefill_passes=1)
    assert token_sources(cut) == (2, 1)


def test_auto_mode_counts_speculative_and_plain_tokens(tiny_artifact):
    result, out, _ = run(tiny_artifact, "auto", as_json=True)
    assert json.loads(out)["speculative_tokens"] == result["speculative_tokens"]
    assert result["mode"] == "speculative" and result["new_tokens"] == 24
    assert result["speculative_tokens"] + result["plain_tokens"] == result["new_tokens"]
    # the speed guard's warm-up decodes plainly after the prefill; then the draft runs
    assert result["plain_tokens"] >= 3 and result["speculative_tokens"] > 0

    _, _, err = run(tiny_artifact, "auto", as_json=False)
    pattern = r"\[auto: (\d+) tokens from speculative cycles with draft mid, (\d+) from plain steps\] "
    label = re.match(pattern, err)
    assert label, err
    assert int(label[1]) + int(label[2]) == 24 and " 24 tokens in " in err


def test_forced_plain_reports_every_token_as_plain(tiny_artifact):
    result, _, _ = run(tiny_artifact, "plain", as_json=True)
    assert result["mode"] == "plain" and result["draft"] is None
    assert result["speculative_tokens"] == 0 and result["plain_tokens"] == result["new_tokens"] == 24

    _, _, err = run(tiny_artifact, "plain", as_json=False)
    assert err.startswith("[plain] 24 tokens in ") and "acceptance n/a" in err


def test_forced_speculative_names_the_draft(tiny_artifact):
    result, _, _ = run(tiny_artifact, "speculative", as_json=True)
    assert result["draft"] == "mid" and result["speculative_tokens"] > result["plain_tokens"] >= 1
    assert result["speculative_tokens"] + result["plain_tokens"] == result["new_tokens"]
