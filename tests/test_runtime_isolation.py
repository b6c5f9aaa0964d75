"""The runtime must import and decode with torch and transformers unavailable."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_runtime_imports_and_decodes_without_torch():
    script = textwrap.dedent(
        """
        import sys
        # A None entry makes `import torch` raise ImportError, as if it were not installed.
        for name in ("torch", "transformers"):
            sys.modules[name] = None
        import numpy as np
        import conflayers_runtime as rt

        class Counter:  # a backend whose next token is always (last token + 1) % 10
            def forward(self, token_ids, start, draft):
                logits = np.zeros((len(token_ids), 10), dtype=np.float32)
                logits[np.arange(len(token_ids)), (np.asarray(token_ids) + 1) % 10] = 5.0
                return logits

        tokens, stats = rt.generate(Counter(), [3], 6)
        assert tokens == [4, 5, 6, 7, 8, 9], tokens
        assert "torch" not in [m for m, v in sys.modules.items() if v is not None]
        print("ok", stats.acceptance_rate)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok 1.0")
