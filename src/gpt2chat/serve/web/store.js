// gpt2chat web page: conversations kept in the browser (localStorage), with no DOM in it.
//
// One key per conversation ("gpt2chat.conversation.<id>"), so two tabs writing different conversations
// never overwrite each other, and a damaged entry is skipped (and left in place) instead of taking the
// others down with it. Which conversation a tab shows is kept in sessionStorage: a reload brings the same
// one back, a new tab starts a new chat. Settings live under "gpt2chat.settings". A conversation is
// { v: 1, id, title, created, updated, messages: [{ role: "user" | "assistant", content, stats?,
// finishReason?, outcome? }] }; `title` is "" until the user renames it (the first question stands in).
// Loaded as a plain script in the page (globalThis.gpt2chatStore) and with require() in the node tests.
(function (root) {
  "use strict";

  const PREFIX = "gpt2chat.conversation.";
  const CURRENT_KEY = "gpt2chat.current";
  const SETTINGS_KEY = "gpt2chat.settings";
  const TITLE_LENGTH = 60;

  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }

  function isMessage(m) {
    return m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string";
  }

  function isConversation(c) {
    return c && c.v === 1 && typeof c.id === "string" && Array.isArray(c.messages) && c.messages.every(isMessage);
  }

  // What the list shows: the user's title, else the first line of the first question, else "New chat".
  function displayTitle(conversation) {
    if (conversation.title) return conversation.title;
    const first = conversation.messages.find((m) => m.role === "user");
    if (!first) return "New chat";
    const line = first.content.trim().split("\n")[0];
    return line.length > TITLE_LENGTH ? line.slice(0, TITLE_LENGTH - 1) + "…" : line || "New chat";
  }

  class ConversationStore {
    // `local` and `session` are Storage objects (window.localStorage / sessionStorage, or stand-ins).
    constructor(local, session) {
      this.local = local;
      this.session = session;
    }

    create() {
      const time = Date.now();
      return { v: 1, id: newId(), title: "", created: time, updated: time, messages: [] };
    }

    load(id) {
      const raw = this.local.getItem(PREFIX + id);
      if (raw === null) return null;
      try {
        const conversation = JSON.parse(raw);
        return isConversation(conversation) ? conversation : null;
      } catch (err) {
        return null;
      }
    }

    // Newest first: [{ id, title, updated }] of every readable conversation.
    list() {
      const entries = [];
      for (let i = 0; i < this.local.length; i++) {
        const key = this.local.key(i);
        if (!key || !key.startsWith(PREFIX)) continue;
        const conversation = this.load(key.slice(PREFIX.length));
        if (conversation) {
          entries.push({ id: conversation.id, title: displayTitle(conversation), updated: conversation.updated });
        }
      }
      return entries.sort((a, b) => b.updated - a.updated);
    }

    // Writes the conversation (an empty one is not kept: a new chat appears once it has a message).
    // Returns false when the browser refused (storage full or disabled); the page then says so.
    save(conversation) {
      try {
        if (!conversation.messages.length && !conversation.title) {
          this.local.removeItem(PREFIX + conversation.id);
        } else {
          conversation.updated = Date.now();
          this.local.setItem(PREFIX + conversation.id, JSON.stringify(conversation));
        }
        return true;
      } catch (err) {
        return false;
      }
    }

    remove(id) {
      this.local.removeItem(PREFIX + id);
    }

    isConversationKey(key) {
      return typeof key === "string" && key.startsWith(PREFIX);
    }

    idOfKey(key) {
      return key.slice(PREFIX.length);
    }

    currentId() {
      try {
        return this.session.getItem(CURRENT_KEY);
      } catch (err) {
        return null;
      }
    }

    setCurrentId(id) {
      try {
        this.session.setItem(CURRENT_KEY, id);
      } catch (err) {
        // no session storage: a reload starts a new chat, nothing else is lost
      }
    }

    loadSettings(defaults) {
      try {
        const saved = JSON.parse(this.local.getItem(SETTINGS_KEY) || "{}");
        const settings = { ...defaults };
        for (const key of Object.keys(defaults)) {
          if (saved && typeof saved[key] === typeof defaults[key]) settings[key] = saved[key];
        }
        return settings;
      } catch (err) {
        return { ...defaults };
      }
    }

    saveSettings(settings) {
      try {
        this.local.setItem(SETTINGS_KEY, JSON.stringify(settings));
        return true;
      } catch (err) {
        return false;
      }
    }
  }

  const api = { ConversationStore, displayTitle, isConversation };
  if (typeof module === "object" && module.exports) module.exports = api;
  else root.gpt2chatStore = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
