"""CI: schemathesis against a live `retrieve serve` over a tiny index (a tiny random model and
three images): no 5xx and no reply outside the OpenAPI description. Stateless, bounded examples.

    python3 .ci/api_fuzz.py            # exit 0 when schemathesis finds nothing
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from support import write_image  # noqa: E402
from support.serving import free_port, wait_until_healthy  # noqa: E402
from support.tiny_model import write_local_dir_model  # noqa: E402

from retrieval import Index  # noqa: E402


def write_index(work: Path, model: str) -> Path:
    """The fuzzed index: three images and a captions file, under `work`."""
    for number in range(3):
        write_image(work / "photos" / f"img{number}.png", (90 * number, 60, 200 - 80 * number))
    (work / "photos" / "captions.tsv").write_text("img0.png#0\ta caption\n")
    with Index.open(work / "index", model=model, create=True) as index:
        index.add(work / "photos")
    return work / "index"


def fuzz(index: Path, examples: int = 15) -> int:
    """schemathesis against `retrieve serve --index index`: its exit status (0 when it finds nothing)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "--index", str(index),
                               "--port", str(port), "--device", "cpu", "--no-access-log"])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url)
        schemathesis = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
        return subprocess.call([schemathesis, "run", f"{url}/openapi.json", "--url", url,
                                "--checks", "not_a_server_error,response_schema_conformance",
                                "--max-examples", str(examples),
                                "--phases", "examples,coverage,fuzzing", "--seed", "1", "--no-color"])
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="api-fuzz-"))
    try:
        index = write_index(work, write_local_dir_model(work / "model", seed=0))
        return fuzz(index, int(os.environ.get("API_FUZZ_EXAMPLES", "15")))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
