"""The search page in headless Chromium: text search, a dropped image, "more like this" on a
click, and a screenshot, all served by the real HTTP stack over a tiny trained CLIP index.

Every page must load nothing but this server's own files and log no console errors."""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image
from support import write_shape_folder
from support.clips import write_clip
from support.serving import running_server
from support.sounds import SOUND_RATE, render_sound, write_captioned_sounds, write_sound
from support.tiny_model import CLASSES, render_shape

from retrieval import Index
from retrieval.train.audio import AudioTrainingOptions

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM}", allow_module_level=True)

from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright  # noqa: E402

# Root runs need --no-sandbox; the rest keep Chromium off Google's servers (there is no network).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 800}
RESULTS_DONE = re.compile(r"^(\d+) results? in \d+ ms$")
CARDS = "#results article.result"
THUMBNAILS_LOADED = f"""(some) => {{
    const images = [...document.querySelectorAll("{CARDS} img")];
    return images.length >= some && images.every((image) => image.complete && image.naturalWidth > 0);
}}"""
# Builds, inside the page, the DataTransfer a real file drag carries.
DATA_TRANSFER = """([data, name, type]) => {
    const bytes = Uint8Array.from(atob(data), (char) => char.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, { type: type || "image/png" }));
    return transfer;
}"""


def class_of(name: str) -> tuple[str, str]:
    """The (colour, shape) a render's file name carries: "red_circle_0.png" -> ("red", "circle")."""
    color, shape, _ = Path(name).stem.split("_")
    return color, shape


@pytest.fixture(scope="module")
def server_url(tmp_path_factory, trained_model) -> Iterator[str]:
    """A server over an index of 27 renders and their captions."""
    root = tmp_path_factory.mktemp("browser")
    with Index.open(root / "index", model=trained_model, create=True) as index:
        index.add(write_shape_folder(root / "shapes", seed=2024))
        index.train_audio(write_captioned_sounds(root / "pairs", seed=7, per_class=6), AudioTrainingOptions(
            epochs=15, width=8, n_mels=32, learning_rate=3e-3, held_out=0), reindex=False)
        index.add(write_sounds(root / "sounds"))
        (root / "videos").mkdir()
        write_clip(root / "videos" / "clip.webm", "libvpx-vp9", "libopus",
                   [("green", "circle"), ("red", "square"), ("blue", "triangle")], seed=4)
        assert index.add(root / "videos").video_encoded == 3
    with running_server(root / "index") as url:
        yield url


def write_sounds(root: Path) -> Path:
    """One held-out sound of every class."""
    rng = np.random.default_rng(8)
    for color, shape in CLASSES:
        write_sound(root / f"{color}_{shape}_0.wav", render_sound(color, shape, rng))
    return root


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server_url) -> Iterator[Page]:
    """The search page, loaded fresh; on teardown, no console errors and no foreign requests."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    errors: list[str] = []
    requests: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(f"{message.text} ({message.location['url']})")

    page.on("console", console)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(server_url)
    yield page
    context.close()
    assert errors == []
    # Only this server's own files: proves the page needs no CDN or other network.
    assert [url for url in requests if not url.startswith(server_url + "/")] == []


def wait_for_results(page: Page, thumbnails: bool = True) -> int:
    """Wait until a search has finished and every thumbnail (if any are due) has loaded;
    the result count."""
    expect(page.locator("#status")).to_have_text(RESULTS_DONE)
    page.wait_for_function(THUMBNAILS_LOADED, arg=int(thumbnails))
    count = int(RESULTS_DONE.match(page.text_content("#status")).group(1))
    assert page.locator(CARDS).count() == count
    return count


def search_text(page: Page, text: str, thumbnails: bool = True) -> int:
    page.fill("#query", text)
    page.click("#search button[type=submit]")
    return wait_for_results(page, thumbnails)


def top_name(page: Page) -> str:
    return page.locator(CARDS).first.locator(".name").text_content()


def png_base64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_a_typed_caption_finds_its_renders(page):
    assert search_text(page, "a red circle") > 0
    assert class_of(top_name(page)) == ("red", "circle")
    assert page.locator(CARDS).first.locator(".text").text_content() == "a red circle"


def test_a_dropped_image_finds_renders_of_its_class(page):
    page.check("input[name=target][value=image]")
    dropped_class = ("green", "triangle")
    dropped = render_shape(*dropped_class, np.random.default_rng(99))  # a new render, not in the index
    transfer = page.evaluate_handle(DATA_TRANSFER, [png_base64(dropped), "dropped.png"])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    assert page.text_content("#upload") == "dropped.png"
    assert wait_for_results(page) > 0
    assert class_of(top_name(page)) == dropped_class


def test_clicking_a_result_searches_for_more_like_it(page):
    page.check("input[name=target][value=image]")
    search_text(page, "a blue square")
    clicked = page.locator(CARDS).nth(1)  # not the top card, so the new ranking must differ
    clicked_id, clicked_name = clicked.get_attribute("data-id"), clicked.locator(".name").text_content()
    with page.expect_response(lambda response: response.url.endswith("/api/search")) as answer:
        clicked.click()
    form = answer.value.request.post_data
    assert re.search(rf'name="like"\r\n\r\n{clicked_id}\r\n', form)
    assert re.search(r'name="target"\r\n\r\nimage\r\n', form)
    assert page.input_value("#query") == ""
    wait_for_results(page)
    top = page.locator(CARDS).first
    assert (top.get_attribute("data-id"), top.locator(".name").text_content()) == (clicked_id, clicked_name)
    assert top.locator(".score").text_content() == "1.000"


def test_sounds_play_in_the_page_and_a_dropped_sound_finds_sounds(page):
    page.check("input[name=target][value=audio]")
    assert search_text(page, "a red circle", thumbnails=False) == 9
    top = page.locator(CARDS).first
    assert class_of(top.locator(".name").text_content().split()[0]) == ("red", "circle")
    player = top.locator("audio")
    assert player.get_attribute("src").endswith("/file#t=0,1")
    page.wait_for_function("audio => audio.readyState >= 1 && audio.duration > 0.9",
                           arg=player.element_handle())  # the file streamed and decoded

    page.fill("#query", "")  # else the dropped sound and the words make one combined query
    page.check("input[name=target][value=auto]")
    wave = io.BytesIO()
    soundfile.write(wave, render_sound("blue", "square", np.random.default_rng(9)), SOUND_RATE, format="WAV")
    transfer = page.evaluate_handle(DATA_TRANSFER, [base64.b64encode(wave.getvalue()).decode(), "q.wav",
                                                    "audio/wav"])
    with page.expect_response(lambda response: response.url.endswith("/api/search")):
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    wait_for_results(page, thumbnails=False)
    assert page.locator(f"{CARDS} audio").count() == 9
    assert class_of(top_name(page).split()[0]) == ("blue", "square")  # auto: sounds for a sound


def test_a_video_result_plays_from_its_moment(page):
    page.check("input[name=target][value=video]")
    search_text(page, "a red square", thumbnails=False)
    top = page.locator(CARDS).first
    assert top.locator(".name").text_content() == "clip.webm 4–8 s"
    player = top.locator("video")
    assert player.get_attribute("src").endswith("/file#t=4,8")
    # the media fragment starts the player at the segment that matched
    page.wait_for_function("video => video.readyState >= 1 && Math.abs(video.currentTime - 4) < 0.5",
                           arg=player.element_handle())


def test_screenshot_of_a_search(page):
    search_text(page, "a blue triangle")
    expect(page.locator("#stats")).to_have_text("27 image · 27 text · 9 audio · 3 video")
    folder = Path(os.environ.get("RETRIEVAL_ARTIFACTS") or Path(__file__).parents[1] / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / "search-page.png"
    page.screenshot(path=shot, full_page=True)
    with Image.open(shot) as image:
        assert image.format == "PNG"
        assert image.width == VIEWPORT["width"] and image.height >= VIEWPORT["height"]
    assert shot.stat().st_size > 50_000  # a page of thumbnails, not a blank one
