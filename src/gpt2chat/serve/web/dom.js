// gpt2chat web page: the DOM pieces app.js assembles: elements, buttons (icons drawn inline, no icon or
// emoji font needed), a message with its stats line and buttons, an error notice, and copying to the
// clipboard (with a fallback where the Clipboard API is not available, e.g. plain http on a LAN address).
// User and model text only ever reaches the DOM as textContent or through the Markdown renderer.
// Loaded as a plain script before app.js: globalThis.gpt2chatDom.
"use strict";

(function (root) {
  const { renderMarkdown } = root.gpt2chatMarkdown;
  const { formatStats } = root.gpt2chatClient;

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Icons are drawn here (no icon font, no emoji font needed); they are constants, never user text.
  const SVG = '<svg viewBox="0 0 24 24" width="15" height="15" fill="none" stroke="currentColor" ' +
    'stroke-width="2" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true"><path d="';
  const ICONS = {
    rename: SVG + 'M4 20h4L19 9l-4-4L4 16v4zM13.5 6.5l4 4"/></svg>',
    delete: SVG + 'M4 7h16M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3"/></svg>',
  };

  function actionButton(action, label, title) {
    const button = element("button", "action");
    if (ICONS[action]) {
      button.innerHTML = ICONS[action];
      button.setAttribute("aria-label", title);
    } else {
      button.textContent = label;
    }
    button.type = "button";
    button.dataset.action = action;
    button.title = title;
    return button;
  }

  async function copyText(text) {
    if (navigator.clipboard && root.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        return true;
      } catch (err) {
        // permission refused: fall back to the selection below
      }
    }
    const area = element("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    let copied = false;
    try {
      copied = document.execCommand("copy");
    } catch (err) {
      copied = false;
    }
    area.remove();
    return copied;
  }

  function flash(button, text) {
    const original = button.textContent;
    button.textContent = text;
    setTimeout(() => { button.textContent = original; }, 1500);
  }

  function statsTitle(message) {
    const stats = message.stats;
    if (!stats) return "";
    const lines = [stats.tokensFromUsage ? "Tokens: the server's count (end-of-turn token included)"
                                         : "Tokens: pieces received (the stream ended before the server's count)",
                   "Tokens/s: the tokens after the first, over the time from the first to the last",
                   "First token: from sending the request to the first piece of text"];
    if (stats.promptTokens !== null) lines.push("Prompt: " + stats.promptTokens + " tokens");
    return lines.join("\n");
  }

  // One message: its text (an assistant's rendered as Markdown), the stats line under a reply, and the
  // buttons; `canEdit` / `canRegenerate` say whether this message gets those two.
  function messageElement(message, index, { canEdit, canRegenerate }) {
    const article = element("article", "message " + message.role);
    article.dataset.index = String(index);
    article.append(element("div", "role", message.role === "user" ? "You" : "Assistant"));
    const content = element("div", "content");
    if (message.role === "assistant") {
      content.classList.add("markdown");
      content.innerHTML = message.content ? renderMarkdown(message.content) : "";
      if (!message.content) content.append(element("span", "muted", "(empty reply)"));
    } else {
      content.textContent = message.content;
    }
    article.append(content);

    const meta = element("div", "meta");
    if (message.role === "assistant") {
      const stats = element("span", "stats", formatStats(message.stats, message.finishReason, message.outcome));
      stats.title = statsTitle(message);
      meta.append(stats);
    }
    const actions = element("span", "actions");
    actions.append(actionButton("copy", "Copy", "Copy this message"));
    if (canEdit) actions.append(actionButton("edit", "Edit", "Edit this message and send it again"));
    if (canRegenerate) {
      actions.append(actionButton("regenerate", message.role === "assistant" ? "Regenerate" : "Get a reply",
                                  "Ask the model for a new reply to the last message"));
    }
    meta.append(actions);
    article.append(meta);
    return article;
  }

  function noticeElement(problem) {
    const box = element("div", "notice");
    box.setAttribute("role", "alert");
    box.append(element("strong", "notice-title", problem.title));
    if (problem.detail) box.append(element("span", "notice-detail", problem.detail));
    return box;
  }

  root.gpt2chatDom = { ICONS, element, actionButton, copyText, flash, messageElement, noticeElement };
})(globalThis);
