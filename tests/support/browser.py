"""Test support: Debian's Chromium driven by Playwright (which cannot download its own browser here)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Root runs need --no-sandbox; the rest keep Chromium off Google's servers (there is no network).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]


def skip_without_chromium() -> None:
    """Skip the calling test module where Debian's Chromium is not installed."""
    if not CHROMIUM.exists():
        pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)",
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
