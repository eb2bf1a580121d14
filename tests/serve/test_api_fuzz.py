"""schemathesis against a live server (`.ci/api_fuzz.py`): no 5xx and no reply outside the
OpenAPI description. Part of the default run, so CI runs it; skipped where schemathesis (the
dev extra) is not installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Examples per operation in the default run (CI's script alone makes 15): every operation is still
# called, through its examples, its coverage cases and this many fuzzed requests.
EXAMPLES = os.environ.get("API_FUZZ_EXAMPLES", "5")
SCHEMATHESIS = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")


@pytest.mark.skipif(not os.path.exists(SCHEMATHESIS), reason="schemathesis is not installed (dev extra)")
def test_schemathesis_finds_no_server_error_and_no_schema_violation():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(ROOT / ".ci" / "api_fuzz.py")], capture_output=True, text=True,
                         timeout=240, env={**os.environ, "API_FUZZ_EXAMPLES": EXAMPLES, "PYTHONPATH": path})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
