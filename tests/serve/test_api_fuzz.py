"""schemathesis against a live server (`.ci/api_fuzz.py`): no 5xx and no reply outside the
OpenAPI description. Part of the default run, so CI runs it; skipped where schemathesis (the
dev extra) is not installed. The index is built here, on the session's tiny model, so that only
the server and schemathesis start processes of their own."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCHEMATHESIS = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
# Examples per operation in the default run (CI's script alone makes 15): every operation is still
# called, through its examples, its coverage cases and this many fuzzed requests.
EXAMPLES = int(os.environ.get("API_FUZZ_EXAMPLES", "5"))


def api_fuzz():
    spec = importlib.util.spec_from_file_location("api_fuzz", ROOT / ".ci" / "api_fuzz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not os.path.exists(SCHEMATHESIS), reason="schemathesis is not installed (dev extra)")
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tiny_model, tmp_path, monkeypatch, capfd):
    # The server child imports this worktree's retrieval, not an installed one.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    fuzz = api_fuzz()
    status = fuzz.fuzz(fuzz.write_index(tmp_path, tiny_model), EXAMPLES)
    out, err = capfd.readouterr()
    assert status == 0, out[-4000:] + err[-2000:]
    # Fewer examples, yet every operation the schema describes was called.
    selected, described = re.search(r"Selected: (\d+)/(\d+)", out).groups()
    assert selected == described == re.search(r"Tested: (\d+)", out).group(1), out[-4000:]
