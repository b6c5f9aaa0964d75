"""Calibration prompts: JSON Lines (``prompt`` or chat ``messages``) or plain text, one per line."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import CalibrationError

DEFAULT_DATA = "calibration.jsonl"  # ships in conflayers_export/data: 32 prompts, 6 kinds of task

Prompt = str | list[dict[str, str]]  # plain text, or chat messages [{"role": ..., "content": ...}]


def default_prompts() -> list[Prompt]:
    text = resources.files("conflayers_export").joinpath("data", DEFAULT_DATA).read_text(encoding="utf-8")
    return _parse(text, f"<package>/{DEFAULT_DATA}", jsonl=True)


def load_prompts(path: str | Path) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration data {path} does not exist: pass a .jsonl or .txt file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path} is not UTF-8 text ({exc})") from exc
    return _parse(text, str(path), jsonl=path.suffix in (".jsonl", ".json"))


def _parse(text: str, name: str, jsonl: bool) -> list[Prompt]:
    prompts: list[Prompt] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{name}, line {number}: not valid JSON ({exc.msg})") from None
        prompts.append(_prompt_of(record, name, number))
    if not prompts:
        raise CalibrationError(f"{name} holds no prompts: give one prompt per line")
    return prompts


def _prompt_of(record: object, name: str, number: int) -> Prompt:
    where = f"{name}, line {number}"
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return record["prompt"]
    if isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
        messages = record["messages"]
        if all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            return messages
        raise CalibrationError(f"{where}: every message needs string 'role' and 'content' fields")
    raise CalibrationError(
        f"{where}: expected an object with a non-empty 'prompt' string or a 'messages' list"
    )
