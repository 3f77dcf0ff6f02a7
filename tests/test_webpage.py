"""The web page at ``/``, in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

One server (the default model, 64x64 images in 2 steps) serves the module. The browser types a
prompt, presses Generate and waits for the image; it also cancels jobs, sees the server's 422 and
429 in the page, and uses the page of a server with ``--api-auth`` (credentials given once). A screenshot of the page with its result is saved under ``tests/artifacts/``.
Never skipped: without chromium or playwright the tests fail, saying what to install (``.ci/run``
installs both).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from serving import LiveServer

from ldm.server.config import Limits, ServerConfig

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # a failure below, not a skip: CI must run these tests
    sync_playwright = None

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TIMEOUT_MS = 60_000
# A job that runs until it is cancelled (a 64 px step takes milliseconds; this takes many seconds).
LONG_STEPS = 500


@pytest.fixture(scope="module")
def live():
    limits = Limits(max_pixels=64 * 64 * 4, max_steps=LONG_STEPS, max_images=4)
    server = LiveServer(ServerConfig(queue_size=1, limits=limits, device="cpu"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.fail("the web page tests need Playwright for Python: pip install -e '.[test]' (.ci/run does)")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("the web page tests need Debian's chromium: apt-get install -y chromium (.ci/run does)")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(live.url + "/")
    expect(page.locator("body.ready")).to_have_count(1)  # the choices came from the server
    yield page
    page.close()


@pytest.fixture(scope="module")
def guarded():
    server = LiveServer(ServerConfig(api_auth=(("ann", "s3cret"),), device="cpu"))
    yield server
    server.stop()


def fill(page, **fields) -> None:
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def screenshot(page, name: str) -> None:
    """The page as it looks now, a test artifact (CI keeps tests/artifacts/; git ignores it)."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / name, full_page=True)
    print(f"screenshot: {ARTIFACTS / name}")


def test_the_page_and_its_files_need_nothing_from_elsewhere(live):
    with live.client() as http:
        html = http.get("/")
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        linked = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert sorted(linked) == ["/static/page.css", "/static/page.js"]
        for answer in (html, *(http.get(path) for path in linked)):
            assert answer.status_code == 200
            assert not re.search(r"https?:|//[a-z]", answer.text), answer.url  # no CDN, no web font: works offline


def test_a_prompt_makes_an_image_shown_with_its_seed_and_prompt(page):
    assert page.locator("#sampler_name option").count() > 1 and page.locator("#scheduler option").count() == 3
    fill(page, prompt="a red circle", width=64, height=64, steps=2, cfg_scale=3, seed=1234)
    page.click("#generate")

    result = page.locator("#gallery .result").first
    image = result.locator("img")
    image.wait_for()
    page.wait_for_function("image => image.complete && image.naturalWidth > 0", arg=image.element_handle())
    assert image.evaluate("image => [image.naturalWidth, image.naturalHeight]") == [64, 64]
    expect(result.locator(".seed")).to_have_text("Seed: 1234")
    expect(result.locator(".prompt")).to_have_text("a red circle")
    expect(result.locator(".infotext")).to_contain_text("Steps: 2")
    screenshot(page, "webpage.png")

    # "Use these settings" puts the image's parameters back into the form.
    fill(page, prompt="something else", seed=-1, steps="")
    result.locator("button.use").click()
    expect(page.locator("#seed")).to_have_value("1234")
    expect(page.locator("#prompt")).to_have_value("a red circle")
    expect(page.locator("#steps")).to_have_value("2")
    expect(page.locator("#sampler_name")).to_have_value("DPM++ 2M")  # what the default sampler was
    expect(page.locator("#error")).to_be_hidden()


def test_the_servers_refusal_is_shown_in_the_page(page):
    fill(page, prompt="a red circle", width=256, height=128, steps=2)  # over the server's --max-pixels
    page.click("#generate")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text(re.compile(r"^422: width: .*--max-pixels"))
    assert page.locator("#gallery .result").count() == 0


def test_queued_and_running_jobs_are_cancelled_from_the_queue(page):
    fill(page, prompt="a long one", width=64, height=64, steps=LONG_STEPS, cfg_scale=3)
    page.click("#generate")
    running = page.locator("#queue li[data-state=running]")
    expect(running).to_have_count(1)
    # The live preview of the running job.
    page.wait_for_function("() => { const p = document.querySelector('#preview'); return p.naturalWidth > 0; }")
    expect(page.locator("#progress-area")).to_be_visible()

    page.click("#generate")  # waits behind the running one: the queue (size 1) is full now
    queued = page.locator("#queue li[data-state=queued]")
    expect(queued).to_have_count(1)
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text(re.compile(r"^429: the queue is full.*retry in \d+ s"))
    screenshot(page, "webpage-queue.png")

    queued.locator("button.cancel").click()
    expect(queued).to_have_count(0)
    expect(running).to_have_count(1)
    running.locator("button.cancel").click()
    expect(page.locator("#queue li")).to_have_count(0)
    expect(page.locator("#queue-empty")).to_be_visible()
    expect(page.locator("#progress-area")).to_be_hidden()
    assert page.locator("#gallery .result").count() == 0  # a cancelled job keeps nothing


def test_with_api_auth_the_page_needs_credentials_and_works_with_them(browser, guarded):
    stranger = browser.new_context()  # no credentials: the browser's auth prompt is cancelled
    with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
        stranger.new_page().goto(guarded.url + "/")
    stranger.close()

    context = browser.new_context(http_credentials={"username": "ann", "password": "s3cret"})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(guarded.url + "/")
    expect(page.locator("body.ready")).to_have_count(1)
    fill(page, prompt="a blue square", width=64, height=64, steps=2, seed=3)
    page.click("#generate")  # fetch, the event stream and the image all carry the credentials
    expect(page.locator("#gallery .result .seed")).to_have_text("Seed: 3")
    page.wait_for_function("() => document.querySelector('#gallery .result img').naturalWidth > 0")
    expect(page.locator("#error")).to_be_hidden()
    context.close()
