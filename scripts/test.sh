#!/usr/bin/env bash
# Set up, lint, then run the whole test suite (extra arguments go to pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${CONFLAYERS_VENV:-$root/.venv}"
cd "$root"
"$venv/bin/ruff" check .
"$venv/bin/python" -m pytest --durations=10 "$@"

# The runtime installed alone, in a fresh virtual environment: an undeclared dependency, or one
# on torch/transformers/onnx, fails here. Its artifact comes from the exporter. With [serve] and
# the openai client: the server's tests (runtime/tests/test_serve.py) run here, without torch.
runtime_venv="${CONFLAYERS_RUNTIME_VENV:-$root/.venv-runtime}"
rm -rf "$runtime_venv"
"${PYTHON:-python3}" -m venv "$runtime_venv"
"$runtime_venv/bin/python" -m pip --disable-pip-version-check -q install \
    -c "$root/scripts/constraints.txt" "$root/runtime[cpu,serve]" openai pytest
artifact_dir="$(mktemp -d)"
trap 'rm -rf "$artifact_dir"' EXIT
"$venv/bin/python" -m tests.helpers "$artifact_dir/tiny"
# Run from the artifact folder: the repository's own packages must not be importable.
(cd "$artifact_dir" && CONFLAYERS_TEST_ARTIFACT="$artifact_dir/tiny" "$runtime_venv/bin/pytest" -p no:cacheprovider \
    --rootdir "$root/runtime" "$root/runtime/tests")
