// gpt2chat web page: the client of the server's OpenAI-compatible API, with no DOM in it.
//
// streamChat() posts one chat completion with stream=true and stream_options.include_usage, reads the
// server-sent events with fetch + ReadableStream, hands each piece of text to a callback and returns what
// happened: the reply, why it ended, the measured speed, and any error put into words a user can act on.
// It never throws for anything the server or the network does. Speed is measured here, on the stream:
// time to first token from sending the request to the first piece of text; tokens from `usage` (the
// server's count, the end-of-turn token included) or, when the stream was cut before `usage`, the pieces
// received; tokens/s over the tokens after the first, from the first piece to the end of the stream.
// Loaded as a plain script in the page (globalThis.gpt2chatClient) and with require() in the node tests.
(function (root) {
  "use strict";

  // Server-sent events arrive in arbitrary slices: push() text, get back the complete `data:` payloads.
  class EventParser {
    constructor() {
      this.buffer = "";
    }

    push(text) {
      this.buffer += text.replace(/\r\n?/g, "\n");
      const payloads = [];
      let cut;
      while ((cut = this.buffer.indexOf("\n\n")) >= 0) {
        const event = this.buffer.slice(0, cut);
        this.buffer = this.buffer.slice(cut + 2);
        const data = event.split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5));
        if (data.length) payloads.push(data.join("\n"));
      }
      return payloads;
    }
  }

  function capitalise(text) {
    return text ? text[0].toUpperCase() + text.slice(1) : text;
  }

  // An HTTP error answer -> { kind, title, detail } in words; `body` is the parsed JSON body or null.
  function describeHttpError(status, body) {
    const error = body && body.error ? body.error : {};
    const detail = typeof error.message === "string" && error.message ? capitalise(error.message) + "." : "";
    const answer = (title) => ({ kind: "http", status, code: error.code || null, title, detail });
    if (status === 400 && error.code === "context_length_exceeded") {
      return answer("This conversation is too long for the model.");
    }
    if (status === 400) return answer("The server did not accept the request.");
    if (status === 401) return answer("The server needs an API key: enter it in Settings.");
    if (status === 413) return answer("The message is too large for the server.");
    if (status === 429) {
      return answer("The server is busy: every slot is taken. Wait a moment, then send again.");
    }
    if (status >= 500) return answer("The server failed (HTTP " + status + ").");
    return answer("The server answered HTTP " + status + ".");
  }

  function unreachable(url) {
    return {
      kind: "unreachable", status: null, code: null, title: "Cannot reach the server.",
      detail: "Nothing answered at " + url + ". Is gpt2chat serve still running?",
    };
  }

  const CONNECTION_LOST = {
    kind: "lost", status: null, code: null, title: "The connection to the server was lost during the reply.",
    detail: "The part that arrived is kept. Regenerate to try again.",
  };

  function isAbort(err) {
    return err && (err.name === "AbortError" || err.name === "TimeoutError");
  }

  function replyStats(timing, usage, pieces) {
    const tokens = usage && Number.isInteger(usage.completion_tokens) ? usage.completion_tokens : pieces;
    const decodeMs = timing.first !== null && timing.end !== null ? timing.end - timing.first : 0;
    return {
      tokens,
      tokensFromUsage: Boolean(usage),
      promptTokens: usage && Number.isInteger(usage.prompt_tokens) ? usage.prompt_tokens : null,
      ttftMs: timing.first !== null ? timing.first - timing.sent : null,
      tokensPerSecond: tokens > 1 && decodeMs > 0 ? (tokens - 1) / (decodeMs / 1000) : null,
    };
  }

  function formatDuration(ms) {
    return ms < 1000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(2) + " s";
  }

  // The line under a reply, e.g. "42 tokens · 31.5 tokens/s · 180 ms to first token".
  function formatStats(stats, finishReason, outcome) {
    if (!stats) return "";
    const parts = [(stats.tokensFromUsage ? "" : "~") + stats.tokens + (stats.tokens === 1 ? " token" : " tokens")];
    if (stats.tokensPerSecond !== null) parts.push(stats.tokensPerSecond.toFixed(1) + " tokens/s");
    if (stats.ttftMs !== null) parts.push(formatDuration(stats.ttftMs) + " to first token");
    if (outcome === "stopped") parts.push("stopped");
    else if (outcome === "error") parts.push("cut off");
    else if (finishReason === "length") parts.push("reached the token limit");
    return parts.join(" · ");
  }

  // Posts `body` (an OpenAI chat request without the stream fields) and streams the reply.
  // onText(piece, contentSoFar) is called for each piece of text. Resolves to
  // { content, finishReason, outcome: "done" | "stopped" | "error", error, stats }.
  async function streamChat({ url, headers, body, signal, onText, fetchImpl, now }) {
    const clock = now || (() => performance.now());
    const doFetch = fetchImpl || ((...args) => root.fetch(...args));
    const timing = { sent: clock(), first: null, end: null };
    const result = { content: "", finishReason: null, outcome: "done", error: null, stats: null };
    let usage = null;
    let pieces = 0;
    const finish = () => {
      if (timing.end === null && timing.first !== null) timing.end = clock();
      result.stats = pieces || usage ? replyStats(timing, usage, pieces) : null;
      return result;
    };
    const fail = (error) => {
      result.outcome = "error";
      result.error = error;
      return finish();
    };

    let response;
    try {
      response = await doFetch(url, {
        method: "POST", headers, signal,
        body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
      });
    } catch (err) {
      if (isAbort(err)) {
        result.outcome = "stopped";
        return finish();
      }
      return fail(unreachable(new URL(url, root.location ? root.location.href : "http://localhost/").origin));
    }
    if (!response.ok) {
      let parsed = null;
      try {
        parsed = await response.json();
      } catch (err) {
        parsed = null; // not JSON (a proxy's page, say): the status alone has to do
      }
      return fail(describeHttpError(response.status, parsed));
    }

    const parser = new EventParser();
    const decoder = new TextDecoder();
    const reader = response.body.getReader();
    let done = false;
    try {
      while (!done) {
        const chunk = await reader.read();
        if (chunk.done) break;
        for (const data of parser.push(decoder.decode(chunk.value, { stream: true }))) {
          if (data.trim() === "[DONE]") {
            done = true;
            break;
          }
          let event;
          try {
            event = JSON.parse(data);
          } catch (err) {
            return fail({ ...CONNECTION_LOST, kind: "protocol", title: "The server sent something unreadable.",
                          detail: "It is not JSON: " + data.slice(0, 120) });
          }
          if (event.error) {
            return fail({ kind: "server", status: null, code: event.error.code || null,
                          title: "The server failed while generating.",
                          detail: capitalise(String(event.error.message || "")) });
          }
          if (event.usage) usage = event.usage;
          const choice = event.choices && event.choices[0];
          if (!choice) continue;
          const piece = choice.delta && typeof choice.delta.content === "string" ? choice.delta.content : "";
          if (piece) {
            if (timing.first === null) timing.first = clock();
            pieces += 1;
            result.content += piece;
            if (onText) onText(piece, result.content);
          }
          if (choice.finish_reason) {
            result.finishReason = choice.finish_reason;
            timing.end = clock();
          }
        }
      }
    } catch (err) {
      if (isAbort(err)) {
        result.outcome = "stopped";
        return finish();
      }
      return fail(CONNECTION_LOST);
    }
    if (!done && result.finishReason === null) return fail(CONNECTION_LOST);
    return finish();
  }

  const api = { EventParser, describeHttpError, replyStats, formatStats, streamChat };
  if (typeof module === "object" && module.exports) module.exports = api;
  else root.gpt2chatClient = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
