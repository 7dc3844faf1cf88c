// gpt2chat web page: a plain client of the server's OpenAI-compatible API (no libraries, no CDN).
// Replies stream over server-sent events read with fetch + ReadableStream; Stop aborts the fetch,
// which makes the server free the request's engine slot at once.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];           // [{role, content}] of the finished turns
let controller = null;        // AbortController of the reply being streamed

function bindRange(id) {
  const input = $(id), out = $(id + "-value");
  const show = () => { out.textContent = input.value; };
  input.addEventListener("input", show);
  show();
}
bindRange("temperature");
bindRange("top-p");
$("api-key").value = localStorage.getItem("gpt2chat-api-key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("gpt2chat-api-key", $("api-key").value));

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : "Error";
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("status").textContent = busy ? "generating…" : "";
}

function requestMessages() {
  const system = $("system").value.trim();
  return (system ? [{ role: "system", content: system }] : []).concat(history);
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + response.status;
}

// Reads `data: ...` events from the response body; calls onEvent with each parsed JSON payload.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.parentElement.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  let content = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        messages: requestMessages(),
        temperature: parseFloat($("temperature").value),
        top_p: parseFloat($("top-p").value),
        max_tokens: parseInt($("max-tokens").value, 10) || 128,
        stream: true,
        truncate: true,
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (event) => {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices && event.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        content += choice.delta.content;
        reply.textContent = content;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    });
  } catch (err) {
    if (err.name !== "AbortError") {
      addMessage("error", String(err.message || err));
    }
  } finally {
    reply.parentElement.classList.remove("streaming");
    reply.parentElement.classList.add("done");
    if (content) {
      history.push({ role: "assistant", content });
    } else {
      history.pop();  // no reply: forget the question too so the history stays user/assistant pairs
      reply.textContent = "(no reply)";
    }
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
  $("status").textContent = "";
});

fetch("/v1/models", { headers: headers() })
  .then((r) => (r.ok ? r.json() : null))
  .then((body) => { if (body && body.data && body.data[0]) $("model-name").textContent = body.data[0].id; })
  .catch(() => {});
