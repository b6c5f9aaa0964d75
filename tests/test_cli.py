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


@pytest.fixture(scope="module")
def tiny_folder(make_tiny, tmp_path_factory):
    model, _ = make_tiny("llama")
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return folder


def test_reference_prints_json_stats(tiny_folder, capsys, monkeypatch):
    # A random model has no tokenizer: give its folder a one-letter-per-token one.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i): i for i in range(26)} | {"[UNK]": 26}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(tiny_folder)
    code = main(
        [
            "reference",
            "--model",
            str(tiny_folder),
            "--prompt",
            "hello",
            "--no-chat",
            "--skip",
            "1,2",
            "--max-new-tokens",
            "12",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["new_tokens"] == 12 and result["skip_layers"] == [1, 2]
    assert result["mode"] == "speculative" and 0.0 <= result["acceptance_rate"] <= 1.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reference", "--model", "nope", "--prompt", "x"], "unknown model 'nope'"),
        (["reference", "--model", "nope", "--prompt", "x", "--skip", "a,b"], "comma-separated layer indices"),
    ],
)
def test_errors_are_one_red_line_and_exit_1(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_skip_set_for_the_model(tiny_folder, capsys):
    assert main(["reference", "--model", str(tiny_folder), "--prompt", "ab", "--no-chat", "--skip", "3"]) == 1
    assert "invalid layers [3]" in capsys.readouterr().err
