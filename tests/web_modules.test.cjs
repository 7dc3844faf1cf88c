// Unit tests of the web page's plain modules (the Markdown renderer, the streaming client, the
// conversation store), run offline by node's built-in test runner: `node --test tests/web_modules.test.cjs`.
// tests/test_web.py runs this file under pytest; the page itself is tested in a real browser there.
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");

const WEB = path.join(__dirname, "..", "src", "gpt2chat", "serve", "web");
const { renderMarkdown, escapeHtml, safeHref } = require(path.join(WEB, "markdown.js"));
const { EventParser, describeHttpError, formatStats, streamChat } = require(path.join(WEB, "client.js"));
const { ConversationStore, displayTitle } = require(path.join(WEB, "store.js"));

// ---- Markdown -------------------------------------------------------------------------------------------

test("paragraphs, line breaks and headings", () => {
  assert.equal(renderMarkdown("one\ntwo\n\nthree"), "<p>one<br>two</p><p>three</p>");
  assert.equal(renderMarkdown("## Title ##\ntext"), "<h2>Title</h2><p>text</p>");
  assert.equal(renderMarkdown("#hashtag"), "<p>#hashtag</p>");
});

test("emphasis, strike and inline code, whose content is escaped and not formatted", () => {
  assert.equal(renderMarkdown("**b** *i* __b2__ _i2_ ~~s~~"),
    "<p><strong>b</strong> <em>i</em> <strong>b2</strong> <em>i2</em> <del>s</del></p>");
  assert.equal(renderMarkdown("`a <b> *c*` and snake_case_name"),
    "<p><code>a &lt;b&gt; *c*</code> and snake_case_name</p>");
  assert.equal(renderMarkdown("2 * 3 * 4"), "<p>2 * 3 * 4</p>");
});

test("fenced code keeps its text exactly, gets a language label and a copy button", () => {
  const html = renderMarkdown("```python\nif a < b:\n    print(\"**x**\")\n```\nafter");
  assert.match(html, /<span class="code-lang">python<\/span><button type="button" class="copy-code">Copy<\/button>/);
  assert.match(html, /<pre><code>if a &lt; b:\n {4}print\(&quot;\*\*x\*\*&quot;\)<\/code><\/pre><\/div><p>after<\/p>$/);
});

test("an unclosed fence (a reply still streaming) is code to the end", () => {
  assert.match(renderMarkdown("Look:\n```js\nlet x = 1;\nlet y"), /<pre><code>let x = 1;\nlet y<\/code><\/pre><\/div>$/);
});

test("lists: nested, ordered with a start number, tight and loose", () => {
  assert.equal(renderMarkdown("- a\n- b\n  - b1\n  - b2\n- c"),
    "<ul><li>a</li><li>b<ul><li>b1</li><li>b2</li></ul></li><li>c</li></ul>");
  assert.equal(renderMarkdown("3. three\n4. four"), '<ol start="3"><li>three</li><li>four</li></ol>');
  assert.equal(renderMarkdown("1. a\n\n2. b"), "<ol><li><p>a</p></li><li><p>b</p></li></ol>");
  assert.equal(renderMarkdown("Steps:\n1. go"), "<p>Steps:</p><ol><li>go</li></ol>");
  assert.equal(renderMarkdown("In 2023. we went"), "<p>In 2023. we went</p>");
});

test("block quotes, rules and tables", () => {
  assert.equal(renderMarkdown("> a\n> b"), "<blockquote><p>a<br>b</p></blockquote>");
  assert.equal(renderMarkdown("---"), "<hr>");
  assert.equal(renderMarkdown("| x | y |\n|:--|--:|\n| 1 | 2 |"),
    '<table><thead><tr><th class="align-left">x</th><th class="align-right">y</th></tr></thead>' +
    '<tbody><tr><td class="align-left">1</td><td class="align-right">2</td></tr></tbody></table>');
});

test("links open in a new tab without the opener; bare URLs too, minus trailing punctuation", () => {
  assert.equal(renderMarkdown("[docs](https://example.org/a_b?x=1&y=2)"),
    '<p><a href="https://example.org/a_b?x=1&amp;y=2" target="_blank" rel="noopener noreferrer nofollow">docs</a></p>');
  assert.equal(renderMarkdown("see https://example.org/x."),
    '<p>see <a href="https://example.org/x" target="_blank" rel="noopener noreferrer nofollow">https://example.org/x</a>.</p>');
  assert.match(renderMarkdown("[a](/relative) [b](#frag) [c](mailto:me@example.org)"),
    /href="\/relative".*href="#frag".*href="mailto:me@example.org"/);
});

const TAGS = new Set(["p", "br", "strong", "em", "del", "code", "pre", "div", "span", "button", "a", "h1", "h2",
  "h3", "h4", "h5", "h6", "ul", "ol", "li", "blockquote", "hr", "table", "thead", "tbody", "tr", "th", "td"]);
const ATTRIBUTES = new Set(["class", "type", "href", "target", "rel", "start"]);

// Every tag in `html` is one the renderer writes, with only its attributes (href passing safeHref), and
// no < > " is left outside a tag.
function assertOnlyOurMarkup(html, input) {
  const tag = /<\/?([a-z0-9]+)((?:\s+[a-z-]+="[^"<>]*")*)\s*>/g;
  let match;
  while ((match = tag.exec(html))) {
    assert.ok(TAGS.has(match[1]), `tag <${match[1]}> from ${JSON.stringify(input)}`);
    for (const attribute of match[2].matchAll(/([a-z-]+)="([^"]*)"/g)) {
      assert.ok(ATTRIBUTES.has(attribute[1]), `attribute ${attribute[1]} from ${JSON.stringify(input)}`);
      if (attribute[1] === "href") assert.notEqual(safeHref(attribute[2]), null, JSON.stringify(input));
    }
  }
  assert.doesNotMatch(html.replace(tag, ""), /[<>"]/, `raw markup left from ${JSON.stringify(input)}`);
}

test("hostile input stays text: no tag, handler or script URL gets through", () => {
  const hostile = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "[click](javascript:alert(1))",
    "[click](javascript:alert%281%29)",
    "[click](JaVaScRiPt:alert%281%29)",
    "[click](data:text/html;base64,PHNjcmlwdD4=)",
    "[click](vbscript:msgbox)",
    '[x](https://ok.example"onmouseover="alert(1))',
    "<a href=\"javascript:alert(1)\">x</a>",
    "`<script>alert(1)</script>`",
    "```\n</code></pre><script>alert(1)</script>\n```",
    "**<svg onload=alert(1)>**",
    "| <b>x</b> |\n|---|\n| <iframe src=//evil> |",
    "&lt;script&gt; &#106;avascript:",
    "\u0000 0\u0001 stash forgery",
  ];
  for (const input of hostile) {
    const html = renderMarkdown(input);
    assert.doesNotMatch(html, /<(?:script|img|svg|iframe|b)\b/i, input);
    assert.doesNotMatch(html, /href="[^"]*(?:script|data):/i, input);
    assertOnlyOurMarkup(html, input);
  }
  assert.match(renderMarkdown("<script>alert(1)</script>"), /&lt;script&gt;alert\(1\)&lt;\/script&gt;/);
  assert.equal(renderMarkdown("&lt;"), "<p>&amp;lt;</p>"); // an entity the model writes is shown, not decoded
});

test("safeHref allows http(s), mailto and relative addresses only", () => {
  for (const good of ["https://a.example", "http://a.example/x", "mailto:a@b.example", "/x", "#y", "page.html", "x/y:z"]) {
    assert.equal(safeHref(escapeHtml(good)), escapeHtml(good), good);
  }
  for (const bad of ["javascript:alert(1)", " javascript:x", "java\tscript:x", "data:text/html,x", "file:///etc/passwd", ""]) {
    assert.equal(safeHref(escapeHtml(bad)), null, JSON.stringify(bad));
  }
});

// Random strings of the characters that matter to HTML and Markdown: whatever comes out, the only tags are
// ours, every attribute is one we write, and no < > " from the input is left raw.
test("fuzz: the output holds only the renderer's own tags and attributes", () => {
  const pieces = ["<", ">", "\"", "'", "&", "*", "_", "`", "```", "~", "[", "]", "(", ")", "|", "-", "#", "\n", "\n\n",
    " ", "  ", "1.", "> ", "javascript:", "https://x.example/", "script", "img", "onerror=", "=", "a", "b", "\\", "&#58;"];
  let seed = 12345;
  const random = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
  for (let n = 0; n < 3000; n++) {
    let input = "";
    const length = 1 + Math.floor(random() * 40);
    for (let i = 0; i < length; i++) input += pieces[Math.floor(random() * pieces.length)];
    assertOnlyOurMarkup(renderMarkdown(input), input);
  }
});

// ---- the streaming client -----------------------------------------------------------------------------------

function sse(events) {
  return events.map((e) => "data: " + (typeof e === "string" ? e : JSON.stringify(e)) + "\n\n").join("");
}

function chunk(content, finish = null) {
  return { object: "chat.completion.chunk", choices: [{ index: 0, delta: content === null ? {} : { content },
           finish_reason: finish }] };
}

// A fetch stand-in: answers with `parts` (strings, sent one by one) and a status; records the request.
function fakeFetch({ parts = [], status = 200, json = null, failWith = null, cutAfter = null, requests = [] }) {
  return async (url, init) => {
    requests.push({ url, init });
    if (failWith) throw failWith;
    if (json !== null) {
      return new Response(JSON.stringify(json), { status, headers: { "Content-Type": "application/json" } });
    }
    let index = 0;
    const body = new ReadableStream({
      pull(controller) {
        if (cutAfter !== null && index === cutAfter) {
          controller.error(new TypeError("network error"));
          return;
        }
        if (index >= parts.length) {
          controller.close();
          return;
        }
        controller.enqueue(new TextEncoder().encode(parts[index++]));
      },
    });
    return new Response(body, { status, headers: { "Content-Type": "text/event-stream" } });
  };
}

// A clock that moves 10 ms per reading, so the timings the client measures are known exactly.
function steppingClock() {
  let t = 1000;
  return () => (t += 10);
}

test("EventParser joins events split anywhere, including CRLF line ends", () => {
  const text = "data: {\"a\":1}\r\n\r\n: comment\n\ndata: [DONE]\n\n";
  for (let cut = 0; cut <= text.length; cut++) {
    const parser = new EventParser();
    const got = [...parser.push(text.slice(0, cut)), ...parser.push(text.slice(cut))];
    assert.deepEqual(got, ['{"a":1}', "[DONE]"], `cut at ${cut}`);
  }
});

test("a streamed reply: text, finish reason, usage-based stats, and the stream fields in the request", async () => {
  const requests = [];
  const stream = sse([chunk(""), chunk("Hel"), chunk("lo"), chunk(null, "length"),
    { object: "chat.completion.chunk", choices: [], usage: { prompt_tokens: 7, completion_tokens: 3, total_tokens: 10 } },
    "[DONE]"]);
  const pieces = [];
  const result = await streamChat({
    url: "http://127.0.0.1:1/v1/chat/completions", headers: {}, body: { messages: [], max_tokens: 3 },
    fetchImpl: fakeFetch({ parts: [stream.slice(0, 17), stream.slice(17)], requests }), now: steppingClock(),
    onText: (piece) => pieces.push(piece),
  });
  assert.equal(result.content, "Hello");
  assert.deepEqual(pieces, ["Hel", "lo"]);
  assert.equal(result.finishReason, "length");
  assert.equal(result.outcome, "done");
  assert.equal(result.error, null);
  // clock readings: sent 1010, first text ("Hel") 1020, finish 1030: 2 tokens after the first in 10 ms
  assert.deepEqual(result.stats, { tokens: 3, tokensFromUsage: true, promptTokens: 7, ttftMs: 10, tokensPerSecond: 200 });
  const sent = JSON.parse(requests[0].init.body);
  assert.equal(sent.stream, true);
  assert.deepEqual(sent.stream_options, { include_usage: true });
  assert.equal(sent.max_tokens, 3);
  assert.equal(formatStats(result.stats, result.finishReason, result.outcome),
    "3 tokens · 200.0 tokens/s · 10 ms to first token · reached the token limit");
});

test("HTTP errors come back in words with the server's message, and no text", async () => {
  const busy = await streamChat({
    url: "/v1/chat/completions", headers: {}, body: {}, now: steppingClock(),
    fetchImpl: fakeFetch({ status: 429, json: { error: { message: "the server is busy (1 requests running)",
                                                          type: "rate_limit_error", code: "queue_full" } } }),
  });
  assert.equal(busy.outcome, "error");
  assert.equal(busy.content, "");
  assert.equal(busy.stats, null);
  assert.match(busy.error.title, /busy/);
  assert.equal(busy.error.detail, "The server is busy (1 requests running).");
  const long = describeHttpError(400, { error: { message: "the prompt is 300 tokens", code: "context_length_exceeded" } });
  assert.match(long.title, /too long/);
  assert.match(describeHttpError(401, null).title, /API key/);
  assert.match(describeHttpError(502, null).title, /502/);
  const notJson = await streamChat({ url: "/x", headers: {}, body: {},
    fetchImpl: async () => new Response("<html>bad gateway</html>", { status: 502 }) });
  assert.match(notJson.error.title, /502/);
});

test("no server, a cut connection, a stream without an end, a server error event, a user stop", async () => {
  const gone = await streamChat({ url: "http://127.0.0.1:9/v1/chat/completions", headers: {}, body: {},
                                  fetchImpl: fakeFetch({ failWith: new TypeError("Failed to fetch") }) });
  assert.equal(gone.error.kind, "unreachable");
  assert.match(gone.error.detail, /http:\/\/127\.0\.0\.1:9/);

  const cut = await streamChat({ url: "/v1/chat/completions", headers: {}, body: {}, now: steppingClock(),
                                 fetchImpl: fakeFetch({ parts: [sse([chunk("par"), chunk("tial")])], cutAfter: 1 }) });
  assert.equal(cut.error.kind, "lost");
  assert.equal(cut.content, "partial");
  assert.equal(cut.stats.tokens, 2);
  assert.equal(cut.stats.tokensFromUsage, false);
  assert.equal(formatStats(cut.stats, null, "error").split(" · ")[0], "~2 tokens");

  const unfinished = await streamChat({ url: "/x", headers: {}, body: {},
                                        fetchImpl: fakeFetch({ parts: [sse([chunk("a")])] }) });
  assert.equal(unfinished.error.kind, "lost");

  const failed = await streamChat({ url: "/x", headers: {}, body: {},
    fetchImpl: fakeFetch({ parts: [sse([chunk("a"), { error: { message: "internal error while generating: boom" } }])] }) });
  assert.equal(failed.error.kind, "server");
  assert.equal(failed.error.detail, "Internal error while generating: boom");

  const abort = new DOMException("aborted", "AbortError");
  const stopped = await streamChat({ url: "/x", headers: {}, body: {}, fetchImpl: fakeFetch({ failWith: abort }) });
  assert.equal(stopped.outcome, "stopped");
  assert.equal(stopped.error, null);
});

// ---- the conversation store ---------------------------------------------------------------------------------

class MemoryStorage {
  constructor() { this.items = new Map(); }
  get length() { return this.items.size; }
  key(i) { return [...this.items.keys()][i] ?? null; }
  getItem(k) { return this.items.has(k) ? this.items.get(k) : null; }
  setItem(k, v) { this.items.set(k, String(v)); }
  removeItem(k) { this.items.delete(k); }
}

test("conversations are saved one key each, listed newest first; empty ones are not kept", async () => {
  const local = new MemoryStorage();
  const store = new ConversationStore(local, new MemoryStorage());
  const first = store.create();
  first.messages.push({ role: "user", content: "First question\nsecond line" }, { role: "assistant", content: "A" });
  assert.ok(store.save(first));
  await new Promise((resolve) => setTimeout(resolve, 5));
  const second = store.create();
  second.title = "Renamed";
  second.messages.push({ role: "user", content: "x" });
  store.save(second);
  const empty = store.create();
  store.save(empty);
  assert.deepEqual(store.list().map((entry) => entry.title), ["Renamed", "First question"]);
  assert.deepEqual(store.load(first.id).messages, first.messages);
  assert.equal(store.load(empty.id), null);
  store.remove(first.id);
  assert.deepEqual(store.list().map((entry) => entry.id), [second.id]);
});

test("a damaged entry is skipped and left in place; a full storage is reported, not thrown", () => {
  const local = new MemoryStorage();
  local.setItem("gpt2chat.conversation.broken", "{not json");
  local.setItem("gpt2chat.conversation.wrong", JSON.stringify({ v: 1, id: "wrong", messages: [{ role: "tool" }] }));
  const store = new ConversationStore(local, new MemoryStorage());
  assert.deepEqual(store.list(), []);
  assert.equal(local.getItem("gpt2chat.conversation.broken"), "{not json");
  const full = new ConversationStore({ ...local, setItem() { throw new Error("QuotaExceededError"); },
                                       removeItem() {} }, new MemoryStorage());
  const conversation = full.create();
  conversation.messages.push({ role: "user", content: "hi" });
  assert.equal(full.save(conversation), false);
});

test("titles and settings", () => {
  assert.equal(displayTitle({ title: "", messages: [] }), "New chat");
  assert.equal(displayTitle({ title: "", messages: [{ role: "user", content: "x".repeat(100) }] }), "x".repeat(59) + "…");
  const store = new ConversationStore(new MemoryStorage(), new MemoryStorage());
  store.local.setItem("gpt2chat.settings", JSON.stringify({ temperature: "hot", maxTokens: 64, unknown: 1 }));
  assert.deepEqual(store.loadSettings({ temperature: 0.8, maxTokens: 256 }), { temperature: 0.8, maxTokens: 64 });
  store.setCurrentId("abc");
  assert.equal(store.currentId(), "abc");
});
