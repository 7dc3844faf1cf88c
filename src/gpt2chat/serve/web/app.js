// gpt2chat web page: the conversation side of the DOM. It wires the conversation list, the messages and
// the composer to the plain modules loaded before it: gpt2chatMarkdown (markdown.js, the renderer),
// gpt2chatClient (client.js, the streaming API client), gpt2chatStore (store.js, localStorage),
// gpt2chatDom (dom.js, the DOM pieces) and gpt2chatPanels (panels.js, the settings and side panels).
// No libraries, no CDN: the page works with the server offline from the internet.
// Stop aborts the fetch, which makes the server free the request's engine slot at once.
"use strict";

(function () {
  const { renderMarkdown } = window.gpt2chatMarkdown;
  const { streamChat } = window.gpt2chatClient;
  const { ConversationStore, displayTitle } = window.gpt2chatStore;
  const { ICONS, element, actionButton, copyText, flash, messageElement, noticeElement } = window.gpt2chatDom;

  const $ = (id) => document.getElementById(id);
  const DEFAULTS = { system: "", temperature: 0.8, topP: 0.95, maxTokens: 256, truncate: true, apiKey: "",
                     settingsOpen: true };

  const store = new ConversationStore(window.localStorage, window.sessionStorage);
  const settings = store.loadSettings(DEFAULTS);
  let conversation = store.load(store.currentId() || "") || store.create();
  let running = null;      // { conv, controller, element, deleted } while a reply streams
  let notice = null;       // { title, detail } shown at the end of the conversation until the next send
  let editing = null;      // { draft } while the composer holds the last user message for editing
  const panels = window.gpt2chatPanels.setupPanels(settings, () => store.saveSettings(settings));

  // ---- the conversation ---------------------------------------------------------------------------------

  function lastIndexOf(role) {
    for (let i = conversation.messages.length - 1; i >= 0; i--) {
      if (conversation.messages[i].role === role) return i;
    }
    return -1;
  }

  function nearBottom() {
    const box = $("messages");
    return box.scrollHeight - box.scrollTop - box.clientHeight < 60;
  }

  function scrollToBottom() {
    const box = $("messages");
    box.scrollTop = box.scrollHeight;
  }

  function renderConversation() {
    const box = $("messages");
    const empty = $("empty-state");
    box.replaceChildren();
    const idle = !(running && running.conv === conversation);
    const lastUser = lastIndexOf("user");
    const items = conversation.messages.map((message, index) => messageElement(message, index, {
      canEdit: idle && index === lastUser,
      canRegenerate: idle && index === conversation.messages.length - 1,
    }));
    empty.hidden = items.length > 0 || Boolean(running && running.conv === conversation);
    box.append(empty, ...items);
    if (running && running.conv === conversation) box.append(running.element);
    if (notice) box.append(noticeElement(notice));
    $("chat-title").textContent = displayTitle(conversation);
    document.title = conversation.messages.length ? displayTitle(conversation) + " · gpt2chat" : "gpt2chat";
    scrollToBottom();
  }

  function renderList() {
    const list = $("conversation-list");
    list.replaceChildren();
    const entries = store.list();
    if (!entries.some((entry) => entry.id === conversation.id)) {
      entries.unshift({ id: conversation.id, title: displayTitle(conversation), updated: conversation.updated });
    }
    for (const entry of entries) {
      const row = element("div", "conversation");
      row.dataset.id = entry.id;
      const open = element("button", "open", entry.title);
      open.type = "button";
      open.title = entry.title;
      if (entry.id === conversation.id) {
        row.classList.add("current");
        open.setAttribute("aria-current", "true");
      }
      row.append(open, actionButton("rename", "", "Rename"), actionButton("delete", "", "Delete"));
      list.append(row);
    }
  }

  function saveConversation(conv) {
    const saved = store.save(conv);
    $("storage-note").textContent = saved ? ""
      : "This browser refused to save the conversation (storage full or disabled): it will be lost on reload.";
  }

  function render() {
    renderConversation();
    renderList();
  }

  // ---- sending ------------------------------------------------------------------------------------------

  function headers() {
    const result = { "Content-Type": "application/json" };
    if (settings.apiKey.trim()) result.Authorization = "Bearer " + settings.apiKey.trim();
    return result;
  }

  function requestBody(conv) {
    const system = settings.system.trim();
    const messages = (system ? [{ role: "system", content: system }] : [])
      .concat(conv.messages.map((m) => ({ role: m.role, content: m.content })));
    return { messages, temperature: settings.temperature, top_p: settings.topP,
             max_tokens: settings.maxTokens, truncate: settings.truncate };
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }

  function keepUnsentText(text) {
    const input = $("input");
    const draft = input.value.trim();
    input.value = draft && draft !== text ? text + "\n\n" + draft : text;
    autoGrow();
  }

  function showEditing(on) {
    $("editing-banner").hidden = !on;
    $("composer").classList.toggle("editing", on);
  }

  // mode: "send" (a new question), "edit" (replace the last question), "regenerate" (a new last reply).
  async function ask(mode, text) {
    if (running) return;
    const conv = conversation;
    const before = conv.messages.slice();
    if (mode === "send") {
      conv.messages.push({ role: "user", content: text });
    } else if (mode === "edit") {
      conv.messages.splice(Math.max(0, lastIndexOf("user")));
      conv.messages.push({ role: "user", content: text });
    } else if (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") {
      conv.messages.pop();
    }
    if (!conv.messages.length) return;
    notice = null;
    if (mode === "edit") {
      editing = null;
      showEditing(false);
    }
    store.setCurrentId(conv.id);
    saveConversation(conv);

    const live = element("article", "message assistant streaming");
    live.append(element("div", "role", "Assistant"), element("div", "content markdown"),
                element("div", "meta"));
    live.querySelector(".meta").append(element("span", "stats", "generating…"));
    running = { conv, controller: new AbortController(), element: live };
    setBusy(true);
    render();

    // The reply so far is drawn at most once a frame: rendering the whole markdown on every piece costs
    // O(length) a token, which at hundreds of tokens a second keeps the page busy and Stop unclickable.
    let latest = null;
    const draw = () => {
      const content = latest;
      latest = null;
      if (conversation !== conv) return;
      const follow = nearBottom();
      live.querySelector(".content").innerHTML = renderMarkdown(content);
      if (follow) scrollToBottom();
    };
    const result = await streamChat({
      url: "/v1/chat/completions", headers: headers(), body: requestBody(conv),
      signal: running.controller.signal,
      onText: (piece, content) => {
        if (latest === null) requestAnimationFrame(draw);
        latest = content;
      },
    });
    const deleted = running.deleted;
    running = null;

    if (result.outcome === "error" && !result.content) {
      conv.messages = before; // the request never produced anything: the conversation is as it was
      if (mode !== "regenerate") keepUnsentText(text); // even if the user has switched conversations since
      if (mode === "edit" && conversation === conv) {
        editing = { draft: "" };
        showEditing(true);
      }
    } else if (result.outcome === "stopped" && !result.content && mode === "regenerate") {
      conv.messages = before; // stopped before a word of the new reply came: keep the old one
    } else if (result.content || result.outcome === "done") {
      conv.messages.push({ role: "assistant", content: result.content, stats: result.stats,
                           finishReason: result.finishReason, outcome: result.outcome });
    }
    if (result.error && conversation === conv) notice = { title: result.error.title, detail: result.error.detail };
    if (!deleted) saveConversation(conv);
    setBusy(false);
    render();
  }

  function submitComposer() {
    const text = $("input").value.trim();
    if (!text || running) return;
    $("input").value = "";
    autoGrow();
    ask(editing ? "edit" : "send", text);
  }

  function startEditing() {
    const index = lastIndexOf("user");
    if (index < 0 || running) return;
    editing = { draft: editing ? editing.draft : $("input").value };
    $("input").value = conversation.messages[index].content;
    showEditing(true);
    autoGrow();
    $("input").focus();
  }

  function cancelEditing() {
    if (!editing) return;
    $("input").value = editing.draft;
    editing = null;
    showEditing(false);
    autoGrow();
  }

  // ---- conversations ------------------------------------------------------------------------------------

  function switchTo(conv) {
    if (editing) cancelEditing();
    conversation = conv;
    notice = null;
    store.setCurrentId(conv.id);
    render();
    if (panels.isNarrow()) panels.setPanel("sidebar", false);
  }

  function startRename(row) {
    const id = row.dataset.id;
    const conv = id === conversation.id ? conversation : store.load(id);
    if (!conv) return;
    const input = element("input", "rename-input");
    input.value = displayTitle(conv);
    input.setAttribute("aria-label", "New name");
    row.querySelector(".open").replaceWith(input);
    input.focus();
    input.select();
    let finished = false;
    const finish = (keep) => {
      if (finished) return;
      finished = true;
      if (keep) {
        conv.title = input.value.trim();
        saveConversation(conv);
      }
      render();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") finish(true);
      if (event.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
  }

  function confirmDelete(row, button) {
    if (!button.classList.contains("confirm")) {
      button.classList.add("confirm");
      button.textContent = "Delete?";
      setTimeout(() => {
        if (button.isConnected) {
          button.classList.remove("confirm");
          button.innerHTML = ICONS.delete;
        }
      }, 3000);
      return;
    }
    const id = row.dataset.id;
    if (running && running.conv.id === id) {
      running.deleted = true; // the reply's end must not save the conversation back
      running.controller.abort();
    }
    store.remove(id);
    if (id === conversation.id) {
      switchTo(store.create());
    } else {
      renderList();
    }
  }

  $("conversation-list").addEventListener("click", (event) => {
    const row = event.target.closest(".conversation");
    if (!row) return;
    const button = event.target.closest("button");
    if (!button) return;
    if (button.dataset.action === "rename") {
      startRename(row);
    } else if (button.dataset.action === "delete") {
      confirmDelete(row, button);
    } else if (button.classList.contains("open") && row.dataset.id !== conversation.id) {
      const conv = store.load(row.dataset.id);
      if (conv) switchTo(conv);
    }
  });

  $("new-chat").addEventListener("click", () => {
    if (conversation.messages.length || conversation.title) switchTo(store.create());
    else if (panels.isNarrow()) panels.setPanel("sidebar", false);
    $("input").focus();
  });

  $("messages").addEventListener("click", async (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    if (button.classList.contains("copy-code")) {
      const code = button.closest(".code-block").querySelector("code");
      if (await copyText(code.textContent)) flash(button, "Copied");
      return;
    }
    const article = button.closest(".message");
    const message = article && conversation.messages[Number(article.dataset.index)];
    if (!message) return;
    if (button.dataset.action === "copy") {
      if (await copyText(message.content)) flash(button, "Copied");
    } else if (button.dataset.action === "edit") {
      startEditing();
    } else if (button.dataset.action === "regenerate") {
      ask("regenerate", "");
    }
  });

  // ---- composer -----------------------------------------------------------------------------------------

  function autoGrow() {
    const input = $("input");
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight + 2, 220) + "px";
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    submitComposer();
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitComposer();
    } else if (event.key === "Escape" && editing) {
      cancelEditing();
    }
  });
  $("input").addEventListener("input", autoGrow);
  $("settings-form").addEventListener("submit", (event) => event.preventDefault());
  $("stop").addEventListener("click", () => { if (running) running.controller.abort(); });
  $("cancel-edit").addEventListener("click", cancelEditing);

  // ---- other tabs, the model's name, start ----------------------------------------------------------------

  window.addEventListener("storage", (event) => {
    if (event.key !== null && !store.isConversationKey(event.key)) return;
    if (event.key === null || store.idOfKey(event.key) === conversation.id) {
      const fresh = store.load(conversation.id);
      if (fresh && !(running && running.conv === conversation)) {
        conversation = fresh;
        renderConversation();
      }
    }
    renderList();
  });

  // The model's name in the top bar; asked again when the API key changes (a 401 leaves it blank).
  function loadModelName() {
    fetch("/v1/models", { headers: headers() })
      .then((response) => (response.ok ? response.json() : null))
      .then((body) => {
        const name = body && body.data && body.data[0] ? String(body.data[0].id) : "";
        $("model-name").textContent = name;
        $("empty-model").textContent = name || "the model";
      })
      .catch(() => {}); // no server: the first message says so in words
  }

  $("api-key").addEventListener("change", loadModelName);
  loadModelName();

  render();
  autoGrow();
})();
