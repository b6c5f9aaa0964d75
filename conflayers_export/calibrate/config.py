"""``calibrate --config FILE``: the rarely changed calibration settings in a TOML file.

Keys are the fields of :class:`~conflayers_export.calibrate.settings.CalibrationSettings` at the
top level of the file (docs/CALIBRATE_CONFIG.md lists them); options given on the command line
override the file. The file is checked key by key: an unknown key or a value of the wrong type is
a CalibrationError naming the key and the fix; ranges are checked with every other setting by
``check_settings``.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

from ..errors import CalibrationError
from .settings import CalibrationSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the 3.10 backport of the same parser
    import tomli as tomllib

# Settings that `calibrate` also takes as options (they override the file); the others are set in
# the file only. Error messages name each setting as the user sets it.
COMMAND_LINE_SETTINGS = frozenset(
    {"skip_ratio", "max_iter", "max_new_tokens", "search", "cost", "dtype", "device", "reference_device"}
)


def setting_name(key: str) -> str:
    """How the user sets ``key``: its option (--max-iter), or the key of the --config file."""
    return f"--{key.replace('_', '-')}" if key in COMMAND_LINE_SETTINGS else f"{key} (--config file)"


def read_config(path: str | Path) -> dict[str, Any]:
    """The settings a config file sets, typed as CalibrationSettings holds them."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"no calibration config at {path}: pass an existing TOML file to --config")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path} is not valid TOML ({exc}): fix the file given to --config") from exc
    hints = typing.get_type_hints(CalibrationSettings)
    known = [f.name for f in dataclasses.fields(CalibrationSettings)]
    settings = {}
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise CalibrationError(
                f"{path}: unknown key {key!r}: {hint}the keys are {', '.join(known)} "
                "(docs/CALIBRATE_CONFIG.md)"
            )
        try:
            settings[key] = _typed(value, hints[key])
        except ValueError:
            raise CalibrationError(
                f"{path}: key {key!r} must be {_describe(hints[key])}, got {value!r}"
            ) from None
    return settings


def _typed(value: Any, expected: Any) -> Any:
    """``value`` (as TOML parsed it) as the ``expected`` type: lists become tuples, integers floats;
    ValueError where it is of another type."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):  # X | None: TOML has no null, so only X is given
        return _typed(value, next(a for a in args if a is not type(None)))
    if origin is tuple:
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if not isinstance(value, list) or len(value) != len(items):
            raise ValueError(value)
        return tuple(_typed(v, t) for v, t in zip(value, items, strict=True))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(value)
    return value


def _describe(expected: Any) -> str:
    """A type as the user writes it in TOML: "an integer", "a list like [8, 0.5]"..."""
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return _describe(next(a for a in typing.get_args(expected) if a is not type(None)))
    if typing.get_origin(expected) is tuple:
        return f"a list like {_example(expected)}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        expected, str(expected)
    )


def _example(expected: Any) -> str:
    args = typing.get_args(expected)
    if typing.get_origin(expected) is not tuple:
        return {int: "8", float: "0.5", str: '"base"'}.get(expected, "...")
    items = args[:1] * 2 if len(args) == 2 and args[1] is Ellipsis else args
    return "[" + ", ".join(_example(a) for a in items) + "]"
