"""The chat page at / in a real browser: the system's headless Chromium driven by playwright (no browser download)
types a question, sees the reply stream in, switches adapter and stops a reply."""
import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from serve_helpers import make_adapter, running_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

# CI installs Chromium and sets PHI3LORA_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping
if not os.access(CHROMIUM, os.X_OK):
    if os.environ.get("PHI3LORA_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"PHI3LORA_REQUIRE_BROWSER=1 but there is no Chromium at {CHROMIUM}")
    pytest.skip(f"needs Chromium at {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    adapter = make_adapter(tmp_path_factory.mktemp("browser") / "a", seed=1)
    with running_server([("mine", str(adapter))]) as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            yield page
        finally:
            browser.close()


def test_chat_page_streams_switches_adapter_and_stops(page):
    page.wait_for_function("document.querySelectorAll('#model option').length == 2")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")[1] == "mine"
    # every length the reply had on the page: more than a couple means it streamed in, piece by piece
    page.evaluate("""() => { window.lengths = new Set(); new MutationObserver(() => {
        const reply = document.querySelector('#log .assistant'); if (reply) lengths.add(reply.textContent.length);
      }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#max_tokens", "120")
    page.fill("#input", "hello there")
    page.click("#send")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('finished')")
    pieces = int(page.text_content("#status").split("(")[1].split()[0])
    assert pieces > 1 and page.evaluate("window.lengths.size") >= 2, page.text_content("#status")
    base_reply = page.text_content("#log .assistant")
    assert base_reply and page.text_content("#log .user") == "hello there"

    page.click("#reset")
    page.select_option("#model", "mine")
    page.fill("#input", "hello there")
    page.click("#send")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('finished')")
    assert page.text_content("#log .assistant") != base_reply  # the adapter answers differently

    # a long reply, stopped: the page says so and takes a new message
    page.click("#reset")
    page.fill("#max_tokens", "900")
    page.fill("#input", "go on and on")
    page.click("#send")
    page.wait_for_function("document.querySelector('#log .assistant').textContent.length > 0")
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent == 'stopped'")
    assert page.is_enabled("#send")
