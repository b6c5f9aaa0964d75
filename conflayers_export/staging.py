"""Write a whole output folder or nothing: build it beside the target, then swap it in."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replace_folder(target: Path, carry_subfolders: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``target``. On error ``target`` is
    untouched and the staging folder is removed. ``carry_subfolders`` copies the target's
    subfolders (e.g. a calibration report) into the staging folder first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    staging.chmod(0o755)  # mkdtemp makes it private; artifacts are meant to be shared
    try:
        if carry_subfolders and target.is_dir():
            for item in target.iterdir():
                if item.is_dir():
                    shutil.copytree(item, staging / item.name)
        yield staging
        _swap(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; at every moment one complete version exists on disk."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
