"""Test support: Debian's Chromium driven by Playwright (which cannot download its own browser here)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

# Debian's headless shell first: the browser tests took half the CPU they take in the full
# browser's headless mode (7 against 15 CPU-s in Chromium's own processes). The full browser
# serves where it is the one installed.
CHROMIUMS = (Path("/usr/bin/chromium-headless-shell"), Path("/usr/bin/chromium"))
CHROMIUM = next((path for path in CHROMIUMS if path.exists()), CHROMIUMS[0])
# Root runs need --no-sandbox; the rest keep Chromium off Google's servers (there is no network).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]


def skip_without_chromium() -> None:
    """Skip the calling test module where Debian's Chromium is not installed."""
    if not CHROMIUM.exists():
        pytest.skip(f"browser tests need Debian's Chromium at {CHROMIUMS[0]} or {CHROMIUMS[1]} "
                    "(apt-get install chromium-headless-shell)",
                    allow_module_level=True)


@contextmanager
def chromium():  # -> playwright.sync_api.Browser; Playwright is imported only where Chromium is
    """A headless Chromium, closed when the block ends."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
