"""The search page in headless Chromium, at a desktop (1280x800) and a phone (390x844) size, served
by the real HTTP stack over a tiny trained CLIP index: searching, uploading (picker, drop, paste)
with a preview, the full-size view with every caption and "more like this", load-more, the
search in the URL (reload, back, shared links), filters, keyboard use, no sideways scrolling on a
phone, and axe-core's accessibility rules (served from a Python package, not a CDN).

Every page must load nothing but this server's own files and log no console errors. Screenshots
land in tests/artifacts/ (or $RETRIEVAL_ARTIFACTS)."""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import soundfile
from PIL import Image, ImageOps
from support import write_shape_folder
from support.browser import chromium, skip_without_chromium
from support.clips import write_clip
from support.serving import running_server
from support.sounds import SOUND_RATE, render_sound, write_captioned_sounds, write_sound
from support.tiny_model import CLASSES, render_shape

from retrieval import Index
from retrieval.train.audio import AudioTrainingOptions

skip_without_chromium()

from axe_playwright_python.sync_playwright import Axe  # noqa: E402
from playwright.sync_api import Browser, ConsoleMessage, Page, expect  # noqa: E402

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
RESULTS_DONE = re.compile(r"^(\d+) results? in \d+ ms$")
CARDS = "#results article.result"
EXTRA_CAPTION = "a shiny red ball on a plain background"  # red_circle_0.png's second caption
MIRRORED = "red_circle_9.png"  # red_circle_0.png mirrored: a near-duplicate
# Thumbnails load lazily: only those on screen must have loaded.
ON_SCREEN = f"""[...document.querySelectorAll("{CARDS} img")]
    .filter((image) => image.getBoundingClientRect().top < window.innerHeight)"""
THUMBNAILS_LOADED = f"""(some) => {{
    const images = {ON_SCREEN};
    return images.length >= some && images.every((image) => image.complete && image.naturalWidth > 0);
}}"""
# Every thumbnail on screen (at least one) has loaded, and its box has its shape (within `tolerance`).
SHAPES_KEPT = f"""(tolerance) => {{
    const images = {ON_SCREEN};
    const kept = (image) => {{
        const natural = image.naturalWidth / image.naturalHeight;
        return Math.abs(image.clientWidth / image.clientHeight - natural) <= tolerance * natural;
    }};
    return images.length > 0
        && images.every((image) => image.complete && image.naturalWidth > 0 && kept(image));
}}"""
# Builds, inside the page, the DataTransfer a real file drag (or paste) carries.
DATA_TRANSFER = """([data, name, type]) => {
    const bytes = Uint8Array.from(atob(data), (char) => char.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, { type: type || "image/png" }));
    return transfer;
}"""
PASTE = """(transfer) => document.dispatchEvent(
    new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true }))"""
NO_SIDEWAYS_SCROLL = "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth"


def class_of(name: str) -> tuple[str, str]:
    """The (colour, shape) a render's file name carries: "red_circle_0.png" -> ("red", "circle")."""
    color, shape, _ = Path(name).stem.split("_")
    return color, shape


@pytest.fixture(scope="module")
def index_dir(made_once, trained_model) -> Path:
    """An index of 27 renders (one with two captions and a mirrored copy), their captions, 9 sounds
    and 3 video segments. Built once per run: when work stealing splits this module between
    workers, the second serves the same index read-only."""
    return made_once("browser", lambda root: build_index(root, trained_model)) / "index"


def build_index(root: Path, trained_model: str) -> None:
    shapes = write_shape_folder(root / "shapes", seed=2024)
    with open(shapes / "captions.tsv", "a") as captions:
        captions.write(f"red_circle_0.png#1\t{EXTRA_CAPTION}\n{MIRRORED}#0\ta red circle\n")
    with Image.open(shapes / "red_circle_0.png") as image:
        ImageOps.mirror(image).save(shapes / MIRRORED)
    with Index.open(root / "index", model=trained_model, create=True) as index:
        index.add(shapes)
        index.train_audio(write_captioned_sounds(root / "pairs", seed=7, per_class=6), AudioTrainingOptions(
            epochs=15, width=8, n_mels=32, learning_rate=3e-3, held_out=0), reindex=False)
        index.add(write_sounds(root / "sounds"))
        (root / "videos").mkdir()
        write_clip(root / "videos" / "clip.webm", "libvpx-vp9", "libopus",
                   [("green", "circle"), ("red", "square"), ("blue", "triangle")], seed=4)
        assert index.add(root / "videos").video_encoded == 3


@pytest.fixture(scope="module")
def server_url(index_dir) -> Iterator[str]:
    with running_server(index_dir) as url:
        yield url


def write_sounds(root: Path) -> Path:
    """One held-out sound of every class."""
    rng = np.random.default_rng(8)
    for color, shape in CLASSES:
        write_sound(root / f"{color}_{shape}_0.wav", render_sound(color, shape, rng))
    return root


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@contextmanager
def open_page(browser: Browser, server_url: str, viewport: dict, path: str = "/",
              expected_errors: str = "^$") -> Iterator[Page]:
    """The search page (at `path`), loaded fresh; on teardown, no console errors (but those
    matching `expected_errors`) and no foreign requests."""
    context = browser.new_context(viewport=viewport)
    context.set_default_timeout(10_000)  # a failure shows in seconds, not half a minute
    page = context.new_page()
    errors: list[str] = []
    requests: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error" and not re.search(expected_errors, message.text):
            errors.append(f"{message.text} ({message.location['url']})")

    page.on("console", console)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    try:
        page.goto(server_url + path)
        yield page
    finally:
        context.close()
    assert errors == []
    # Only this server's own files (and the page's own uploads): proves the page needs no CDN.
    assert [url for url in requests if not url.startswith((server_url + "/", "blob:"))] == []


@pytest.fixture
def page(browser, server_url) -> Iterator[Page]:
    with open_page(browser, server_url, DESKTOP) as page:
        yield page


@pytest.fixture
def phone(browser, server_url) -> Iterator[Page]:
    with open_page(browser, server_url, PHONE) as page:
        yield page


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
    with page.expect_response(lambda response: response.url.endswith("/api/search")):
        page.click("#search button[type=submit]")
    return wait_for_results(page, thumbnails)


def top_name(page: Page) -> str:
    return page.locator(CARDS).first.locator(".name").text_content()


def card_ids(page: Page) -> list[str]:
    return page.locator(CARDS).evaluate_all("cards => cards.map((card) => card.dataset.id)")


def url_query(page: Page) -> dict[str, list[str]]:
    return parse_qs(urlsplit(page.url).query)


def png_base64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def open_filters(page: Page) -> None:
    if page.get_attribute("#filters", "open") is None:
        page.click("#filters summary")


def screenshot(page: Page, name: str, full_page: bool = True) -> Path:
    folder = Path(os.environ.get("RETRIEVAL_ARTIFACTS") or Path(__file__).parents[1] / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / name
    page.screenshot(path=shot, full_page=full_page)
    with Image.open(shot) as image:
        assert image.format == "PNG"
        assert image.width == page.viewport_size["width"]
    return shot


def serious_violations(page: Page) -> list[str]:
    """axe-core's serious and critical findings on the page as it is now, one line each."""
    found = Axe().run(page).response["violations"]
    return [f"{violation['id']} ({violation['impact']}): "
            + ", ".join(" ".join(node["target"]) for node in violation["nodes"])
            for violation in found if violation["impact"] in ("serious", "critical")]


# -- searching ---------------------------------------------------------------------------------------

def test_a_typed_caption_finds_its_renders(page):
    assert search_text(page, "a red circle") > 0
    assert class_of(top_name(page)) == ("red", "circle")
    assert page.locator(CARDS).first.locator(".text").text_content() == "a red circle"


def test_thumbnails_keep_their_shape(page):
    """A card's picture box has the thumbnail's own shape, so nothing is cropped or barred."""
    search_text(page, "a blue square")
    # Only thumbnails on screen are sure to have loaded (those below load lazily, and one still
    # loading measures 0 / 0); and a loaded one takes its shape in its load handler, which may
    # run after `complete` turns true: so wait until the shapes settle (a page that never keeps
    # them fails at the wait's timeout).
    page.wait_for_function(SHAPES_KEPT, arg=0.03)
    boxes = page.evaluate(f"""() => {ON_SCREEN}
        .map((i) => [i.naturalWidth / i.naturalHeight, i.clientWidth / i.clientHeight])""")
    assert boxes
    for natural, shown in boxes:
        assert shown == pytest.approx(natural, rel=0.03)


def test_a_dropped_image_shows_a_preview_and_finds_renders_of_its_class(page):
    page.check("input[name=target][value=image]")
    dropped_class = ("green", "triangle")
    dropped = render_shape(*dropped_class, np.random.default_rng(99))  # a new render, not in the index
    transfer = page.evaluate_handle(DATA_TRANSFER, [png_base64(dropped), "dropped.png"])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    assert page.text_content("#upload") == "dropped.png"
    expect(page.locator("#preview-image")).to_be_visible()
    assert page.eval_on_selector("#preview-image", "image => image.complete && image.naturalWidth") \
        == dropped.width
    assert wait_for_results(page) > 0
    assert class_of(top_name(page)) == dropped_class

    page.click("#clear-upload")
    expect(page.locator("#preview")).to_be_hidden()
    expect(page.locator("#query")).to_be_focused()


def test_a_picked_file_and_a_pasted_one_are_searched_with_a_preview(page, tmp_path):
    page.check("input[name=target][value=image]")
    picked = tmp_path / "picked.png"
    render_shape("green", "triangle", np.random.default_rng(99)).save(picked)
    page.set_input_files("#file", picked)
    expect(page.locator("#preview-image")).to_be_visible()
    assert wait_for_results(page) > 0
    assert class_of(top_name(page)) == ("green", "triangle")

    pasted = render_shape("red", "triangle", np.random.default_rng(6))
    transfer = page.evaluate_handle(DATA_TRANSFER, [png_base64(pasted), "pasted.png"])
    with page.expect_response(lambda response: response.url.endswith("/api/search")):
        page.evaluate(PASTE, transfer)
    assert page.text_content("#upload") == "pasted.png"
    wait_for_results(page)
    assert class_of(top_name(page)) == ("red", "triangle")


# -- the full-size view --------------------------------------------------------------------------------

def test_a_click_opens_the_full_size_view_with_every_caption(page):
    page.check("input[name=target][value=image]")
    search_text(page, "a red circle")
    cards = page.locator(CARDS)
    names = cards.locator(".name").all_text_contents()
    position = names.index("red_circle_0.png")
    searches: list[str] = []
    page.on("request", lambda request: searches.append(request.url) if "/api/search" in request.url else None)
    cards.nth(position).click()

    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    expect(page.locator("#viewer-title")).to_have_text("red_circle_0.png")
    expect(page.locator("#viewer-captions li")).to_have_text(["a red circle", EXTRA_CAPTION])
    assert page.text_content("#viewer-path").endswith("/shapes/red_circle_0.png")
    assert page.text_content("#viewer-score") == cards.nth(position).locator(".score").text_content()
    size = (Path(page.text_content("#viewer-path"))).stat().st_size
    shown_size = f"{size / 1000:.1f} KB" if size >= 1000 else f"{size} B"
    expect(page.locator("#viewer-size")).to_have_text(shown_size)
    # the original file, full size (the renders are larger than their 256 px thumbnails' boxes)
    page.wait_for_function("() => { const i = document.querySelector('#viewer-media img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    shown = page.get_attribute("#viewer-media img", "src")
    assert shown.endswith(f"/api/items/{card_ids(page)[position]}/file")
    assert searches == []  # a click shows the item; it no longer searches

    page.keyboard.press("ArrowRight")
    expect(page.locator("#viewer-title")).to_have_text(names[position + 1])
    page.keyboard.press("Escape")
    expect(viewer).to_be_hidden()


def test_more_like_this_is_a_button_in_the_view(page):
    page.check("input[name=target][value=image]")
    search_text(page, "a blue square")
    clicked = page.locator(CARDS).nth(1)  # not the top card, so the new ranking must differ
    clicked_id, clicked_name = clicked.get_attribute("data-id"), clicked.locator(".name").text_content()
    clicked.click()
    with page.expect_response(lambda response: response.url.endswith("/api/search")) as answer:
        page.click("#viewer-like")
    form = answer.value.request.post_data
    assert re.search(rf'name="like"\r\n\r\n{clicked_id}\r\n', form)
    assert re.search(r'name="target"\r\n\r\nimage\r\n', form)
    assert page.input_value("#query") == ""
    expect(page.locator("#viewer")).to_be_hidden()
    wait_for_results(page)
    top = page.locator(CARDS).first
    assert (top.get_attribute("data-id"), top.locator(".name").text_content()) == (clicked_id, clicked_name)
    assert top.locator(".score").text_content() == "1.000"
    assert url_query(page)["like"] == [clicked_id]


# -- pagination, the URL and filters -------------------------------------------------------------------

def test_load_more_adds_the_next_results(page):
    page.check("input[name=target][value=image]")
    open_filters(page)
    page.fill("#k", "5")
    assert search_text(page, "a green square") == 5
    first = card_ids(page)
    page.click("#load-more")
    expect(page.locator("#status")).to_have_text(re.compile(r"^10 results"))
    wait_for_results(page)
    after = card_ids(page)
    assert after[:5] == first and len(set(after)) == 10
    page.click("#load-more")
    expect(page.locator("#status")).to_have_text(re.compile(r"^15 results"))


def test_the_search_lives_in_the_url(page, server_url):
    page.check("input[name=target][value=image]")
    open_filters(page)
    page.fill("#k", "7")
    page.fill("#f-text", "red")
    assert search_text(page, "a red circle") == 7
    assert url_query(page) == {"q": ["a red circle"], "target": ["image"], "k": ["7"], "text": ["red"]}
    first = card_ids(page)

    search_text(page, "a blue square")
    page.go_back()
    expect(page.locator("#query")).to_have_value("a red circle")
    wait_for_results(page)
    assert card_ids(page) == first
    page.go_forward()
    expect(page.locator("#query")).to_have_value("a blue square")

    shared = f"{server_url}/?q=a+red+circle&target=image&k=7&text=red"
    page.goto(shared)  # a shared link restores the form and the results
    wait_for_results(page)
    assert card_ids(page) == first
    assert page.is_checked("input[name=target][value=image]")
    assert page.input_value("#k") == "7" and page.input_value("#f-text") == "red"
    page.reload()
    wait_for_results(page)
    assert card_ids(page) == first


def test_filters_change_the_results(page):
    page.check("input[name=target][value=image]")
    unfiltered = search_text(page, "a shape")
    open_filters(page)
    page.fill("#f-text", "blue")
    expect(page.locator("#filter-text")).to_have_text("modality:image text:blue")
    filtered = search_text(page, "a shape")
    assert 0 < filtered < unfiltered
    assert all("blue" in text for text in page.locator(f"{CARDS} .text").all_text_contents())

    page.fill("#f-text", "")
    with page.expect_response(lambda response: response.url.endswith("/api/search")) as answer:
        page.fill("#f-to", "2001-01-01")  # every file was written during the test
    assert re.search(r'name="filter"\r\n\r\nmodality:image mtime<=2001-01-01\r\n',
                     answer.value.request.post_data)
    expect(page.locator("#status")).to_have_text(re.compile(r"^0 results"))


def test_near_duplicates_fold_into_one_card(page):
    page.check("input[name=target][value=image]")
    search_text(page, "a red circle")
    names = page.locator(f"{CARDS} .name").all_text_contents()
    assert {"red_circle_0.png", MIRRORED} <= set(names)
    open_filters(page)
    with page.expect_response(lambda response: response.url.endswith("/api/search")):
        page.check("#dedup")
    wait_for_results(page)
    assert url_query(page)["dedup"] == ["1"]
    pair = {"red_circle_0.png", MIRRORED}
    names = page.locator(f"{CARDS} .name").all_text_contents()
    kept = pair & set(names)
    assert len(kept) == 1  # the other one is folded into it
    card = page.locator(CARDS).nth(names.index(*kept))
    folded = [line.split()[0] for line in card.locator(".duplicates div").all_text_contents()]
    assert pair - kept <= set(folded)


# -- keyboard, phones and accessibility ----------------------------------------------------------------

def test_every_control_is_reached_by_keyboard(page):
    page.focus("#query")
    page.keyboard.press("Tab")
    expect(page.locator("#file")).to_be_focused()  # the upload control
    page.keyboard.press("Shift+Tab")
    expect(page.locator("#query")).to_be_focused()
    page.keyboard.type("a green circle")
    page.keyboard.press("Enter")
    wait_for_results(page)
    page.locator(f"{CARDS} .open").first.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#viewer")).to_be_visible()
    expect(page.locator("#viewer-like")).to_be_focused()  # the dialog's first control
    page.keyboard.press("Escape")
    expect(page.locator("#viewer")).to_be_hidden()
    expect(page.locator(f"{CARDS} .open").first).to_be_focused()  # back where it was


def test_no_serious_accessibility_violations(page):
    assert serious_violations(page) == []
    search_text(page, "a red circle")
    open_filters(page)
    assert serious_violations(page) == []
    page.locator(CARDS).first.click()
    expect(page.locator("#viewer-captions li")).not_to_have_count(0)
    assert serious_violations(page) == []


def test_a_phone_sized_screen_needs_no_sideways_scrolling(phone):
    assert phone.evaluate(NO_SIDEWAYS_SCROLL)
    open_filters(phone)
    assert search_text(phone, "a blue triangle") > 0
    assert phone.evaluate(NO_SIDEWAYS_SCROLL)
    assert serious_violations(phone) == []
    screenshot(phone, "search-page-phone.png", full_page=False)  # thumbnails below load lazily
    phone.locator(CARDS).first.click()
    expect(phone.locator("#viewer-captions li")).not_to_have_count(0)
    phone.wait_for_function("() => { const i = document.querySelector('#viewer-media img');"
                            " return i && i.complete && i.naturalWidth > 0; }")
    right = phone.eval_on_selector("#viewer", "dialog => dialog.getBoundingClientRect().right")
    assert right <= PHONE["width"]
    assert serious_violations(phone) == []
    screenshot(phone, "viewer-phone.png", full_page=False)


# -- sounds and videos -----------------------------------------------------------------------------------

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
    expect(page.locator("#preview")).to_contain_text("q.wav")  # a sound has a name, not a picture
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


def test_screenshots_of_a_search_and_of_the_view(page):
    search_text(page, "a blue triangle")
    expect(page.locator("#stats")).to_have_text("28 images · 29 texts · 9 sounds · 3 videos")
    shot = screenshot(page, "search-page.png")
    assert shot.stat().st_size > 50_000  # a page of thumbnails, not a blank one
    page.locator(CARDS).first.click()
    expect(page.locator("#viewer-captions li")).not_to_have_count(0)
    page.wait_for_function("() => { const i = document.querySelector('#viewer-media img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    screenshot(page, "viewer.png", full_page=False)


# -- access tokens ---------------------------------------------------------------------------------------

TOKEN = "page-test-token"


def test_a_token_from_the_link_or_asked_for_is_sent_and_kept_out_of_the_url(browser, index_dir):
    with running_server(index_dir, token=TOKEN) as url:
        with open_page(browser, url, DESKTOP, path=f"/#token={TOKEN}") as page:
            sent: list[str | None] = []
            page.on("request", lambda request: sent.append(request.headers.get("authorization"))
                    if "/api/" in request.url else None)
            assert page.evaluate("location.hash") == ""  # a copied link does not carry it
            search_text(page, "a red circle")  # thumbnails too: fetched with the token, shown as blobs
            assert sent and set(sent) == {f"Bearer {TOKEN}"}

        # 401s are expected until the token is given
        with open_page(browser, url, DESKTOP, expected_errors="status of 401") as page:
            expect(page.locator("#token-dialog")).to_be_visible()
            page.fill("#token-input", TOKEN)
            page.keyboard.press("Enter")
            expect(page.locator("#token-dialog")).to_be_hidden()
            assert search_text(page, "a red circle") > 0
            assert page.evaluate("sessionStorage.getItem('retrieval-token')") == TOKEN
