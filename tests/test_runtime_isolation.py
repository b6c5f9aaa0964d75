"""The runtime must load an artifact and decode with torch, transformers and onnx unavailable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conflayers_export.models import load_model
from tests.helpers import build

# Runs in a fresh interpreter: an import finder placed first records and refuses every import of
# the heavy packages, so a runtime that imports one (even inside try/except) is caught.
SCRIPT = textwrap.dedent(
    """
    import sys

    HEAVY = ("torch", "transformers", "onnx")
    attempts = []

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                attempts.append(name)
                raise ImportError(f"{name} is refused in this test")
            return None

    sys.meta_path.insert(0, Refuse())
    import conflayers_runtime as rt

    model = rt.load(sys.argv[1], draft="mid")
    plain = model.generate("abcdef", 16, chat=False, mode="plain").token_ids
    assert model.generate("abcdef", 16, chat=False, mode="speculative").token_ids == plain
    assert not attempts, attempts
    assert not [m for m in sys.modules if m.split(".")[0] in HEAVY]
    try:  # the finder does catch an import: the exporter needs torch
        import conflayers_export.models  # noqa: F401
    except ImportError:
        pass
    print("ok", len(plain), sorted({a.split(".")[0] for a in attempts}))
    """
)


def test_runtime_loads_and_decodes_without_torch_transformers_or_onnx(tiny_folder, tmp_path):
    build(tmp_path / "a", load_model(str(tiny_folder("llama"))), {"mid": [1, 2]})
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "a")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["ok", "16"]
    assert "torch" in result.stdout  # the control import was refused, so the finder works
