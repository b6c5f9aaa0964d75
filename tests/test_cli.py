"""The command line: fast help, JSON output, one clear error line and exit code 1 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conflayers_export.cli import main


def test_help_does_not_import_torch():
    code = (
        "import sys; from conflayers_export.cli import main; main(['--help']); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("False"), result.stderr


def test_reference_prints_json_stats(tiny_folder, capsys):
    argv = [
        "reference",
        "--model",
        str(tiny_folder("llama")),
        "--prompt",
        "hello",
        "--no-chat",
        "--skip",
        "1,2",
        "--max-new-tokens",
        "12",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["new_tokens"] == 12 and result["skip_layers"] == [1, 2]
    assert result["mode"] == "speculative" and 0.0 <= result["acceptance_rate"] <= 1.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reference", "--model", "nope", "--prompt", "x"], "unknown model 'nope'"),
        (["reference", "--model", "nope", "--prompt", "x", "--skip", "a,b"], "--skip takes layer indices"),
        (["reference", "--model", "nope", "--prompt", "x", "--skip", "3.ffn"], "such as 3,7,5.mlp"),
        (["validate", "."], "no manifest.json"),
    ],
)
def test_errors_are_one_red_line_and_exit_1(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_skip_set_for_the_model(tiny_folder, capsys):
    argv = ["reference", "--model", str(tiny_folder("llama")), "--prompt", "ab", "--no-chat", "--skip", "3"]
    assert main(argv) == 1
    assert "invalid layers [3]" in capsys.readouterr().err
