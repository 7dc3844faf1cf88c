"""The web chat page in a real headless browser (Debian's chromium driven by Playwright): type a message,
watch the reply stream in, keep multi-turn history, stop a reply mid-way, reset. Skips cleanly when
chromium or Playwright is missing. The stand-in engine paces tokens so the streaming is observable."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from gpt2chat.serve.app import create_app
from test_serve_helpers import ServerThread, StandInEngine, standin_service, wait_until

CHROMIUM = os.environ.get("GPT2CHAT_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = Path(os.environ.get("GPT2CHAT_SCREENSHOT", "/tmp/gpt2chat-web.png"))
STAND_IN_TOKENS = ["I", " am", " a", " test", "."]


def expected_reply(tokens: int) -> str:
    return "".join(STAND_IN_TOKENS[i % len(STAND_IN_TOKENS)] for i in range(tokens))


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"no chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site():
    engine = StandInEngine(step_s=0.03)
    service = standin_service(engine, max_tokens_limit=400, n_positions=1024)
    with ServerThread(create_app(service)) as srv:
        srv.service, srv.engine = service, engine
        yield srv
    service.close()


def test_chat_page_streams_keeps_history_stops_and_resets(browser, site):
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    sent_bodies: list[dict] = []
    page.on("request", lambda r: sent_bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(site.url) else None)
    page.goto(site.url + "/")
    assert page.title() == "gpt2chat"
    page.wait_for_function("document.getElementById('model-name').textContent === 'stand-in'")

    page.fill("#system", "You are a careful assistant.")
    page.fill("#max-tokens", "24")
    page.fill("#input", "Hello, who are you?")
    page.press("#input", "Enter")

    reply = page.locator(".message.assistant .content").first
    seen: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and page.locator(".message.assistant.done").count() == 0:
        seen.append(reply.text_content() or "")
        time.sleep(0.02)
    final = expected_reply(24)
    assert reply.text_content() == final
    partial = {text for text in seen if text and text != final}
    assert partial and all(final.startswith(text) for text in partial)  # it grew token by token

    first = sent_bodies[0]
    assert first["stream"] is True and first["max_tokens"] == 24
    assert first["temperature"] == pytest.approx(0.8) and first["top_p"] == pytest.approx(0.95)
    assert first["messages"] == [{"role": "system", "content": "You are a careful assistant."},
                                 {"role": "user", "content": "Hello, who are you?"}]

    # second turn carries the history
    page.fill("#input", "Tell me more.")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.message.assistant.done').length === 2")
    assert [m["role"] for m in sent_bodies[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent_bodies[1]["messages"][2]["content"] == final

    # stop a long reply mid-way: the browser aborts the fetch, the server frees the engine slot
    page.fill("#max-tokens", "400")
    page.fill("#input", "Now talk for a long time.")
    page.press("#input", "Enter")
    page.wait_for_function(
        "document.querySelectorAll('.message.assistant .content')[2].textContent.length > 10")
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.screenshot(path=str(SCREENSHOT))
    page.click("#stop")
    page.wait_for_function("document.querySelectorAll('.message.assistant.done').length === 3")
    assert wait_until(lambda: site.engine.active_count == 0 and site.service.outstanding == 0, timeout=5)
    stopped = page.locator(".message.assistant .content").nth(2).text_content()
    assert 10 < len(stopped) < len(expected_reply(400))
    assert page.is_enabled("#send") and not page.is_enabled("#stop")

    # reset clears the conversation; the next request starts from the system prompt alone
    page.click("#reset")
    assert page.locator(".message").count() == 0
    page.fill("#max-tokens", "3")
    page.fill("#input", "Fresh start")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.message.assistant.done').length === 1")
    assert sent_bodies[-1]["messages"] == [{"role": "system", "content": "You are a careful assistant."},
                                           {"role": "user", "content": "Fresh start"}]
    assert outside == []  # nothing fetched from anywhere but our server
    page.close()


def test_chat_page_shows_server_errors(browser, site):
    page = browser.new_page()
    page.goto(site.url + "/")
    page.fill("#max-tokens", "100000")  # over the server's per-request limit: a 400 the page must show
    page.fill("#input", "Hi")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.error")
    assert "max_tokens" in page.locator(".message.error .content").text_content()
    assert page.is_enabled("#send")
    page.close()
