"""The web chat page in a real headless browser: Debian's chromium driven by Playwright against
`gpt2chat serve` processes (the real server, the real engine) on tiny random models.

Streaming, reload, regenerate, edit, the conversation list, the layouts and the 400 / 429 / server-gone
errors run against real servers. What a random model cannot be asked to write (Markdown, injection
strings, a reply with known timing) comes from a scripted stream, for those tests only: the page's fetch
of /v1/chat/completions is answered inside the browser with server-sent events in OpenAI's shape, built
from the server's own response schema (`gpt2chat.serve.schemas`); the rest of the page still talks to a
real server. The page's plain modules (renderer, client, store) have node unit tests, run here too.
Skips cleanly without chromium, Playwright or node. Set GPT2CHAT_SCREENSHOTS_DIR=docs/screenshots to
refresh the README's screenshots (they go to a temporary folder otherwise).
This file is over 400 lines because each test drives the page through a whole user story.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.serve_process import ServeProcess
from gpt2chat.serve import schemas

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser tests skip (see `browser`); the node unit tests still run
    expect = sync_playwright = None

CHROMIUM = os.environ.get("GPT2CHAT_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[1]
ENDLESS_CONTEXT = 16384  # room for a reply that is still streaming while a test acts on it


def build_endless_checkpoint(out: Path) -> Path:
    """A tiny random model that never samples a special token, with a long context, so that a reply is
    still streaming text whenever a test acts on it (a random model may otherwise stop at any token).
    The tied embedding is scaled up (logits of spread ~8) and the special tokens' rows are zero (logit 0,
    about e^-30 below the best token)."""
    import torch

    from gpt2chat.checkpoint import init_checkpoint, load_model, save_pretrained
    from gpt2chat.model import GPT

    base, tokenizer = load_model(init_checkpoint("tiny", out / "base", template="llama3-context"))
    # every special token (the stop tokens among them): they would end the reply or print nothing
    silent_ids = sorted(set(tokenizer.special_token_ids) | {tokenizer.eos_token_id})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(base.config.replace(n_positions=ENDLESS_CONTEXT))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(50.0)
        model.transformer.wte.weight[silent_ids] = 0.0
    return save_pretrained(model, tokenizer, out / "endless", template="llama3-context")


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"no chromium at {CHROMIUM}")
    if sync_playwright is None:
        pytest.skip("playwright is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def servers(browser, tiny_checkpoint, tmp_path_factory):
    """Both servers start at once (each imports torch): `main` on the tiny model (context 256), `busy` on
    the endless model with one row and no queue (--max-batch 1 --max-queue 0)."""
    logs = tmp_path_factory.mktemp("serve-logs")
    main = ServeProcess(tiny_checkpoint, logs / "main.log", "--device", "cpu", "--max-batch", "4",
                        "--model-name", "tiny-random")
    endless = build_endless_checkpoint(tmp_path_factory.mktemp("endless"))
    busy = ServeProcess(endless, logs / "busy.log", "--device", "cpu", "--max-batch", "1", "--max-queue", "0",
                        "--max-tokens-limit", str(ENDLESS_CONTEXT))
    try:
        yield {"main": main, "busy": busy}
    finally:
        for process in (main, busy):
            process.interrupt()
        for process in (main, busy):
            process.stop()


@pytest.fixture(scope="module")
def server(servers) -> ServeProcess:
    return servers["main"].wait_ready()


@pytest.fixture(scope="module")
def busy_server(servers) -> ServeProcess:
    return servers["busy"].wait_ready()


class Watch:
    """What a page did that it should not: dialogs, requests to another origin, script errors, console
    errors (a Content-Security-Policy refusal shows up there). Also the chat requests' bodies."""

    def __init__(self, page, origin: str):
        self.dialogs: list[str] = []
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.chat_bodies: list[dict] = []
        self.requests: list[str] = []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("request", self._request)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("console", self._console)
        self.origin = origin

    def _console(self, message) -> None:
        # the browser's own line for an HTTP error or a refused connection is expected where a test
        # provokes one (requests are watched separately); anything else logged as an error is not
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(f"console: {message.text}")

    def _request(self, request) -> None:
        self.requests.append(request.url)
        if not request.url.startswith(self.origin + "/") and not request.url.startswith("data:"):
            self.outside.append(request.url)
        if request.url.endswith("/v1/chat/completions"):
            self.chat_bodies.append(json.loads(request.post_data))


def scripted_reply(pieces: list[str], *, first_delay_ms: int = 0, gap_ms: int = 0, finish_reason: str = "stop",
                   prompt_tokens: int = 12) -> dict:
    """One reply as the server streams it: a role chunk, one chunk per piece, the finish chunk, the usage
    chunk (completion tokens = pieces + the end-of-turn token), [DONE]; with the delay before each event."""
    completion_id, created = schemas.new_id("chatcmpl"), schemas.now()

    def event(choices: list[schemas.ChatChunkChoice], usage: schemas.Usage | None = None) -> str:
        chunk = schemas.ChatCompletionChunk(id=completion_id, created=created, model="scripted",
                                            system_fingerprint="fp_scripted", choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json()}\n\n"

    events = [event([schemas.ChatChunkChoice(index=0, delta=schemas.ChunkDelta(role="assistant", content=""))])]
    events += [event([schemas.ChatChunkChoice(index=0, delta=schemas.ChunkDelta(content=p))]) for p in pieces]
    events.append(event([schemas.ChatChunkChoice(index=0, delta=schemas.ChunkDelta(), finish_reason=finish_reason)]))
    completion = len(pieces) + (1 if finish_reason == "stop" else 0)
    events.append(event([], schemas.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                                          total_tokens=prompt_tokens + completion)))
    events.append("data: [DONE]\n\n")
    delays = [0, first_delay_ms] + [gap_ms] * (len(events) - 2)
    return {"events": events, "delays": delays[: len(events)]}


# Replaces the page's fetch of /v1/chat/completions (only that URL) with the scripted replies, in order;
# each event is enqueued after its delay (setTimeout, so Playwright's clock can drive it).
SCRIPTED_FETCH = """
(() => {
  const replies = %s;
  const realFetch = window.fetch.bind(window);
  window.fetch = (input, init) => {
    const url = new URL(typeof input === "string" ? input : input.url, location.href);
    if (url.pathname !== "/v1/chat/completions" || !replies.length) return realFetch(input, init);
    const reply = replies.shift();
    const encoder = new TextEncoder();
    const body = new ReadableStream({
      start(controller) {
        let index = 0;
        const next = () => {
          if (index >= reply.events.length) { controller.close(); return; }
          controller.enqueue(encoder.encode(reply.events[index++]));
          if (index < reply.events.length && reply.delays[index]) setTimeout(next, reply.delays[index]);
          else next();
        };
        if (reply.delays[0]) setTimeout(next, reply.delays[0]); else next();
      },
    });
    return Promise.resolve(new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } }));
  };
})();
"""


@pytest.fixture
def open_page(browser):
    """open_page(server, width=, height=, dark=, settings=, replies=, storage=, clock=, bypass_csp=) -> a
    page (its own browser context) with `page.watch`; the page must log no error by the end of the test."""
    contexts = []
    watches: list[Watch] = []

    def open_(site: ServeProcess, *, width: int = 1280, height: int = 800, dark: bool = False,
              settings: dict | None = None, replies: list[dict] | None = None, storage: dict | None = None,
              clock: bool = False, bypass_csp: bool = False):
        context = browser.new_context(viewport={"width": width, "height": height},
                                      color_scheme="dark" if dark else "light", bypass_csp=bypass_csp)
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site.url)
        contexts.append(context)
        storage = dict(storage or {})
        current = storage.pop("current", None)
        preset = {"gpt2chat.settings": json.dumps({"temperature": 1.0, **(settings or {})}), **storage}
        # seeds localStorage once per context (a reload must find what the page saved, not the preset)
        context.add_init_script(f"""if (!sessionStorage.getItem("test.seeded")) {{
            sessionStorage.setItem("test.seeded", "1");
            for (const [k, v] of Object.entries({json.dumps(preset)})) localStorage.setItem(k, v);
            {f'sessionStorage.setItem("gpt2chat.current", {json.dumps(current)});' if current else ''}
        }}""")
        if replies is not None:
            context.add_init_script(SCRIPTED_FETCH % json.dumps(replies))
        page = context.new_page()
        if clock:
            page.clock.install(time=0)
        page.watch = Watch(page, site.url)
        watches.append(page.watch)
        page.goto(site.url + "/")
        expect(page.locator("#model-name")).not_to_be_empty()
        return page

    yield open_
    for context in contexts:
        context.close()
    for watch in watches:
        assert watch.errors == [], watch.errors


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_for_replies(page, count: int, timeout: float = 120_000) -> None:
    # locators, not wait_for_function: the page's Content-Security-Policy forbids the eval that needs
    expect(page.locator(".message.assistant:not(.streaming)")).to_have_count(count, timeout=timeout)
    expect(page.locator("body")).not_to_have_class(re.compile(r"\bbusy\b"), timeout=timeout)


def wait_until_streaming(page, timeout: float = 120_000) -> None:
    """Until the reply being streamed shows more than 20 characters."""
    expect(page.locator(".message.streaming .content")).to_have_text(re.compile(r"[\s\S]{21,}"), timeout=timeout)


def texts(page, selector: str) -> list[str]:
    return page.locator(selector).all_text_contents()


# The DOM the page's renderer makes of a text, serialised the way inner_html() serialises it.
RENDERED = """(text) => {
  const box = document.createElement("div");
  box.innerHTML = gpt2chatMarkdown.renderMarkdown(text);
  return box.innerHTML;
}"""


def stored_messages(page) -> list[dict]:
    """The current conversation as the page saved it in localStorage (role and content only)."""
    saved = page.evaluate("localStorage.getItem('gpt2chat.conversation.' + sessionStorage.getItem('gpt2chat.current'))")
    return [{"role": m["role"], "content": m["content"]} for m in json.loads(saved)["messages"]]


def streamed_text(response) -> tuple[str, dict]:
    """The text and the usage in a finished SSE response body, as the server sent them."""
    text, usage = "", {}
    for line in response.text().splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
    return text, usage


# ---- the real server ---------------------------------------------------------------------------------


def test_a_reply_streams_in_shows_its_speed_and_survives_a_reload(server, open_page):
    page = open_page(server, settings={"maxTokens": 24})
    # every state the streaming reply passes through, as the user saw it
    page.evaluate("""window.seen = []; new MutationObserver(() => {
        const live = document.querySelector('.message.streaming .content');
        if (live) window.seen.push(live.textContent);
      }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as answer:
        send(page, "Hello there")
    wait_for_replies(page, 1)
    streamed, usage = streamed_text(answer.value)
    body = page.watch.chat_bodies[0]
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 24 and body["truncate"] is True

    # the page kept exactly what the server sent, and shows it through the renderer
    assert stored_messages(page) == [{"role": "user", "content": "Hello there"},
                                     {"role": "assistant", "content": streamed}]
    reply = page.locator(".message.assistant .content").first
    assert reply.inner_html() == page.evaluate(RENDERED, streamed)
    seen = [s for s in page.evaluate("window.seen") if s]
    assert len(set(seen)) >= 2, seen  # it grew piece by piece
    stats = page.locator(".message.assistant .stats").first.text_content()
    assert stats.startswith(f"{usage['completion_tokens']} tokens · ")
    assert "tokens/s" in stats and "to first token" in stats
    assert texts(page, "#conversation-list .open") == ["Hello there"]

    page.reload()
    page.wait_for_selector(".message.assistant")
    assert texts(page, ".message.user .content") == ["Hello there"]
    assert page.locator(".message.assistant .content").first.inner_html() == reply.inner_html()
    assert page.locator(".message.assistant .stats").first.text_content() == stats
    assert page.locator("#chat-title").text_content() == "Hello there"


def test_regenerate_replaces_only_the_last_reply(server, open_page):
    page = open_page(server, settings={"maxTokens": 8})
    send(page, "First question")
    wait_for_replies(page, 1)
    send(page, "Second question")
    wait_for_replies(page, 2)
    first, second = [m["content"] for m in stored_messages(page) if m["role"] == "assistant"]
    page.evaluate("document.querySelectorAll('.message.assistant')[1].dataset.old = 'yes'")
    assert page.locator(".message.assistant").nth(0).locator("[data-action=regenerate]").count() == 0

    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as answer:
        page.locator(".message.assistant").nth(1).locator("[data-action=regenerate]").click()
    wait_for_replies(page, 2)
    streamed, _ = streamed_text(answer.value)
    assert [m["content"] for m in page.watch.chat_bodies[2]["messages"]] == [
        "First question", first, "Second question"]
    assert stored_messages(page) == [{"role": "user", "content": "First question"},
                                     {"role": "assistant", "content": first},
                                     {"role": "user", "content": "Second question"},
                                     {"role": "assistant", "content": streamed}]
    assert streamed != second  # 8 freshly sampled tokens of a random model
    assert page.locator("[data-old]").count() == 0  # the old reply's element is gone
    assert page.locator(".message.assistant .content").nth(1).inner_html() == page.evaluate(RENDERED, streamed)
    assert texts(page, ".message.user .content") == ["First question", "Second question"]


def test_edit_the_last_question_and_send_it_again_copy_a_message(server, open_page):
    page = open_page(server, settings={"maxTokens": 6})
    send(page, "Original question")
    wait_for_replies(page, 1)
    page.fill("#input", "a draft")
    page.locator(".message.user [data-action=edit]").click()
    assert page.input_value("#input") == "Original question" and page.is_visible("#editing-banner")
    page.click("#cancel-edit")
    assert page.input_value("#input") == "a draft" and not page.is_visible("#editing-banner")

    page.locator(".message.user [data-action=edit]").click()
    send(page, "Edited question")
    wait_for_replies(page, 1)
    assert page.watch.chat_bodies[-1]["messages"] == [{"role": "user", "content": "Edited question"}]
    assert texts(page, ".message.user .content") == ["Edited question"]
    assert page.locator(".message").count() == 2 and not page.is_visible("#editing-banner")

    page.locator(".message.user [data-action=copy]").click()
    assert page.evaluate("navigator.clipboard.readText()") == "Edited question"


def test_conversations_can_be_switched_renamed_deleted_and_come_back(server, open_page):
    page = open_page(server, settings={"maxTokens": 4})
    send(page, "About cats")
    wait_for_replies(page, 1)
    page.click("#new-chat")
    assert page.locator(".message").count() == 0 and page.is_visible("#empty-state")
    send(page, "About dogs")
    wait_for_replies(page, 1)
    assert texts(page, "#conversation-list .open") == ["About dogs", "About cats"]

    page.locator("#conversation-list .open", has_text="About cats").click()
    assert texts(page, ".message.user .content") == ["About cats"]
    page.locator(".conversation.current [data-action=rename]").click()
    page.fill(".rename-input", "Feline facts")
    page.press(".rename-input", "Enter")
    assert page.locator("#chat-title").text_content() == "Feline facts"

    dogs = page.locator(".conversation", has_text="About dogs")
    dogs.locator("[data-action=delete]").click()
    assert dogs.locator("[data-action=delete]").text_content() == "Delete?"  # a second click deletes
    dogs.locator("[data-action=delete]").click()
    assert texts(page, "#conversation-list .open") == ["Feline facts"]

    page.reload()
    assert texts(page, "#conversation-list .open") == ["Feline facts"]
    assert texts(page, ".message.user .content") == ["About cats"]


def test_the_narrow_layout_shows_the_conversation_first(server, open_page):
    page = open_page(server, width=390, height=844, settings={"maxTokens": 6})
    send(page, "Hi from a phone")
    wait_for_replies(page, 1)
    assert not page.is_visible("#settings") and not page.is_visible("#sidebar")
    for selector in ("#messages", ".message.user", ".message.assistant", "#input", "#send"):
        box = page.locator(selector).first.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844, selector
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways

    page.click("#toggle-settings")
    assert page.is_visible("#system") and page.is_visible("#scrim")
    assert page.locator("#settings").bounding_box()["width"] <= 390
    page.click("#scrim", position={"x": 20, "y": 400})
    assert not page.is_visible("#settings")
    page.click("#toggle-sidebar")
    assert page.locator("#conversation-list .open").first.is_visible()
    page.keyboard.press("Escape")
    assert not page.is_visible("#sidebar")


def test_a_conversation_too_long_for_the_model_is_refused_in_words_and_the_text_kept(server, open_page):
    page = open_page(server, settings={"maxTokens": 4})
    send(page, "A short question")
    wait_for_replies(page, 1)
    long_text = "word " * 400  # 400 tokens; the tiny model's context is 256
    send(page, long_text)
    notice = page.wait_for_selector(".notice")
    assert "too long" in notice.text_content() and "256 tokens" in notice.text_content()
    assert page.input_value("#input") == long_text.strip()
    assert texts(page, ".message.user .content") == ["A short question"]
    page.reload()
    assert texts(page, ".message.user .content") == ["A short question"]  # nothing half-sent was saved


def wait_for_outstanding(site: ServeProcess, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while site.health()["outstanding_requests"] != count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert site.health()["outstanding_requests"] == count


# Counts the page's markdown renders in <html data-renders> (an attribute: the page's CSP forbids eval).
COUNT_RENDERS = """(() => {
  let api;
  Object.defineProperty(globalThis, "gpt2chatMarkdown", {
    configurable: true,
    get() { return api; },
    set(value) {
      const render = value.renderMarkdown;
      api = { ...value, renderMarkdown: (text) => {
        const html = document.documentElement;
        html.dataset.renders = String(Number(html.dataset.renders || 0) + 1);
        return render(text);
      } };
    },
  });
})();"""


def test_a_fast_stream_is_drawn_once_a_frame_not_once_a_token(server, open_page):
    """2,000 pieces arriving as fast as the page can read them: the reply so far is rendered at most once an
    animation frame (a render per piece, O(length) each, froze the page at a fast server's rate and left
    Stop unclickable), and the finished reply holds every piece."""
    pieces = [f"w{i} " for i in range(2000)]
    page = open_page(server, replies=[scripted_reply(pieces)])
    page.context.add_init_script(COUNT_RENDERS)
    page.reload()  # the counter is in place before markdown.js runs; the scripted reply is still unused
    expect(page.locator("#model-name")).not_to_be_empty()
    send(page, "Count for me")
    wait_for_replies(page, 1)
    assert page.locator(".message.assistant .content").text_content().split() == [p.strip() for p in pieces]
    renders = int(page.locator("html").get_attribute("data-renders") or 0)
    assert 1 <= renders < len(pieces) // 10, renders


def test_a_full_server_a_stopped_reply_and_a_server_gone(busy_server, open_page):
    long = {"maxTokens": ENDLESS_CONTEXT - 100}
    streaming, refused = (open_page(busy_server, settings=long) for _ in range(2))
    send(streaming, "Tell me a long story")
    wait_until_streaming(streaming)

    send(refused, "Are you there?")  # the only row is taken and nothing may wait: a real 429
    notice = refused.wait_for_selector(".notice")
    assert "busy" in notice.text_content()
    assert refused.input_value("#input") == "Are you there?"
    assert refused.locator(".message").count() == 0

    streaming.click("#stop")
    wait_for_replies(streaming, 1)
    assert streaming.locator(".message.assistant .stats").text_content().endswith("· stopped")
    wait_for_outstanding(busy_server, 0)  # Stop freed the row at once

    refused.press("#input", "Enter")  # the kept text, sent as it is
    wait_until_streaming(refused)
    assert refused.locator(".notice").count() == 0
    busy_server.kill()
    notice = refused.wait_for_selector(".notice")
    assert "connection to the server was lost" in notice.text_content()
    wait_for_replies(refused, 1)
    assert len(refused.locator(".message.assistant .content").text_content()) > 20  # what came is kept
    assert refused.locator(".message.assistant .stats").text_content().endswith("· cut off")

    send(refused, "Still there?")
    expect(refused.locator(".notice")).to_contain_text("Cannot reach the server")
    assert refused.input_value("#input") == "Still there?"
    assert texts(refused, ".message.user .content") == ["Are you there?"]


# ---- scripted replies: what a random model cannot be asked to write ----------------------------------

MARKDOWN = """## Reversing a list

Two ways, **both** built in:

1. `reversed(items)` gives an *iterator*;
2. `items[::-1]` makes a copy.

```python
items = [1, 2, 3]
print(items[::-1])  # [3, 2, 1]
```

| way | copies |
|---|:---:|
| `reversed` | no |
| slicing | yes |

> `items.reverse()` works in place.

See the [docs](https://docs.python.org/3/library/functions.html#reversed)."""
CODE = "items = [1, 2, 3]\nprint(items[::-1])  # [3, 2, 1]"


def pieces_of(text: str, size: int = 7) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_replies_are_rendered_as_markdown_with_copyable_code(server, open_page):
    page = open_page(server, replies=[scripted_reply(pieces_of(MARKDOWN))])
    send(page, "How do I reverse a list? **not bold** in my own words")
    wait_for_replies(page, 1)
    reply = page.locator(".message.assistant .content")
    assert reply.locator("h2").text_content() == "Reversing a list"
    assert reply.locator("strong").text_content() == "both" and reply.locator("em").text_content() == "iterator"
    assert reply.locator("ol > li").count() == 2
    assert reply.locator("ol code").all_text_contents() == ["reversed(items)", "items[::-1]"]
    assert reply.locator(".code-block .code-lang").text_content() == "python"
    assert reply.locator(".code-block pre code").text_content() == CODE
    assert reply.locator("th").all_text_contents() == ["way", "copies"]
    assert reply.locator("th").nth(1).get_attribute("class") == "align-center"
    assert reply.locator("td").all_text_contents() == ["reversed", "no", "slicing", "yes"]
    assert reply.locator("blockquote").text_content() == "items.reverse() works in place."
    link = reply.locator("a")
    assert link.text_content() == "docs" and link.get_attribute("target") == "_blank"
    assert link.get_attribute("href") == "https://docs.python.org/3/library/functions.html#reversed"
    assert "noopener" in link.get_attribute("rel").split()
    # what the user typed is shown as typed
    assert page.locator(".message.user .content strong").count() == 0
    assert page.locator(".message.user .content").text_content().endswith("**not bold** in my own words")

    copy = reply.locator(".copy-code")
    copy.click()
    assert page.evaluate("navigator.clipboard.readText()") == CODE
    expect(copy).to_have_text("Copied")
    page.locator(".message.assistant [data-action=copy]").click()
    assert page.evaluate("navigator.clipboard.readText()") == MARKDOWN  # a message copies as written
    assert stored_messages(page)[1]["content"] == MARKDOWN


HOSTILE_REPLY = ("Here: <script>alert('script')</script> and <img src=x onerror=alert('img')> and "
                 "<img src=\"http://evil.example/pixel.png\"> and [click me](javascript:alert('link')) and "
                 "<a href=\"javascript:alert('anchor')\">anchor</a> <iframe src=\"http://evil.example/\"></iframe>"
                 "\n\n```html\n<script>alert('code')</script>\n```\n\n**<svg onload=alert('svg')>**")
HOSTILE_USER = "<img src=x onerror=alert('user')> [me](javascript:alert('user link'))"


def assert_inert(page) -> None:
    messages = page.locator("#messages")
    for selector in ("script", "img", "iframe", "svg", "[onerror]", "[onload]"):
        assert messages.locator(selector).count() == 0, selector
    # the only links are the two plain URLs written in the text; nothing became a javascript: link
    hrefs = [a.get_attribute("href") for a in messages.locator("a").all()]
    assert hrefs == ["http://evil.example/pixel.png", "http://evil.example/"]
    reply = page.locator(".message.assistant .content").text_content()
    for literal in ("<script>alert('script')</script>", "<img src=x onerror=alert('img')>",
                    "[click me](javascript:alert('link'))", "<a href=\"javascript:alert('anchor')\">anchor</a>",
                    "<svg onload=alert('svg')>"):
        assert literal in reply, literal
    assert page.locator(".message.assistant pre code").text_content() == "<script>alert('code')</script>"
    assert page.locator(".message.user .content").text_content() == HOSTILE_USER
    page.get_by_text("click me", exact=False).click()
    page.wait_for_timeout(300)  # room for an image error handler or a link to fire, if any existed
    assert page.watch.dialogs == []
    assert page.watch.outside == []
    assert not [u for u in page.watch.requests if "/x" == httpx.URL(u).path]


@pytest.mark.parametrize("csp", [True, False], ids=["as-shipped", "renderer-alone"])
def test_injection_strings_stay_inert_text(server, open_page, csp):
    """With the page's Content-Security-Policy, and without it (so the renderer's escaping is all)."""
    page = open_page(server, replies=[scripted_reply(pieces_of(HOSTILE_REPLY, 5))], bypass_csp=not csp)
    send(page, HOSTILE_USER)
    wait_for_replies(page, 1)
    assert_inert(page)
    page.reload()
    page.wait_for_selector(".message.assistant")
    assert_inert(page)  # and when the saved conversation is drawn again


def test_under_each_reply_tokens_speed_and_time_to_first_token(server, open_page):
    # 20 pieces, the first 250 ms after the request, then one every 10 ms; the finish 10 ms after the last;
    # usage says 21 tokens (the end-of-turn token too). Playwright's clock makes the times exact.
    page = open_page(server, replies=[scripted_reply(["tok "] * 20, first_delay_ms=250, gap_ms=10)], clock=True)
    page.clock.pause_at(60_000)
    send(page, "Count for me")
    page.clock.run_for(2_000)
    wait_for_replies(page, 1)
    expected = "21 tokens · 100.0 tokens/s · 250 ms to first token"
    assert page.locator(".message.assistant .stats").text_content() == expected
    page.reload()
    assert page.locator(".message.assistant .stats").text_content() == expected


def screenshot_conversations() -> dict:
    """localStorage entries of a few saved conversations (scripted: the test models are random)."""
    now = 1_760_000_000_000
    second = "Slicing works the same way: `\"hello\"[::-1]` gives `\"olleh\"`. Strings have no `reverse()`, since they cannot change in place."
    current = {"v": 1, "id": "current", "title": "", "created": now, "updated": now, "messages": [
        {"role": "user", "content": "How do I reverse a list in Python?"},
        {"role": "assistant", "content": MARKDOWN, "finishReason": "stop", "outcome": "done",
         "stats": {"tokens": 118, "tokensFromUsage": True, "promptTokens": 24, "ttftMs": 86, "tokensPerSecond": 41.3}},
        {"role": "user", "content": "And for a string?"},
        {"role": "assistant", "content": second, "finishReason": "stop", "outcome": "done",
         "stats": {"tokens": 37, "tokensFromUsage": True, "promptTokens": 160, "ttftMs": 112, "tokensPerSecond": 40.8}},
    ]}
    entries = {"gpt2chat.conversation.current": json.dumps(current), "current": "current"}
    for i, title in enumerate(["Explain the KV cache in two sentences", "A haiku about a slow CPU",
                               "What does ORPO change compared to DPO?", "Draft a note to the team"]):
        entries[f"gpt2chat.conversation.old{i}"] = json.dumps(
            {"v": 1, "id": f"old{i}", "title": "", "created": now - (i + 1) * 3_600_000,
             "updated": now - (i + 1) * 3_600_000, "messages": [{"role": "user", "content": title}]})
    return entries


def luminance(css_color: str) -> float:
    red, green, blue = (int(v) for v in re.findall(r"\d+", css_color)[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


def test_layouts_wide_narrow_and_dark_with_their_screenshots(server, open_page, tmp_path):
    out = Path(os.environ.get("GPT2CHAT_SCREENSHOTS_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    storage = screenshot_conversations()

    defaults = {"temperature": 0.8}
    wide = open_page(server, storage=storage, settings=defaults)
    boxes = [wide.locator(s).bounding_box() for s in ("#sidebar", "#chat", "#settings")]
    assert all(boxes) and boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"]
    assert boxes[1]["x"] + boxes[1]["width"] <= boxes[2]["x"]  # three columns side by side
    assert luminance(wide.evaluate("getComputedStyle(document.body).backgroundColor")) > 0.9
    wide.screenshot(path=str(out / "wide.png"))
    wide.click("#close-settings")  # a closed settings panel gives the conversation the room, and stays closed
    assert wide.locator("#chat").bounding_box()["width"] > boxes[1]["width"]
    wide.reload()
    assert not wide.is_visible("#settings")

    narrow = open_page(server, width=390, height=844, storage=storage, settings=defaults)
    assert not narrow.is_visible("#settings") and not narrow.is_visible("#sidebar")
    narrow.screenshot(path=str(out / "narrow.png"))
    narrow.click("#toggle-settings")
    narrow.screenshot(path=str(out / "narrow-settings.png"))

    dark = open_page(server, dark=True, storage=storage, settings=defaults)
    assert luminance(dark.evaluate("getComputedStyle(document.body).backgroundColor")) < 0.15
    assert luminance(dark.evaluate("getComputedStyle(document.body).color")) > 0.8
    dark.screenshot(path=str(out / "dark.png"))


def test_page_modules_pass_their_node_unit_tests():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    result = subprocess.run([node, "--test", str(REPO / "tests" / "web_modules.test.cjs")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and re.search(r"# pass [1-9]", result.stdout)
