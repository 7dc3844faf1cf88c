// gpt2chat web page: the settings panel and the two side panels. Each settings field is bound to the
// saved settings object (applied as soon as it is usable); the conversation list and the settings are
// columns on a wide screen and drawers on a narrow one (the settings below 1100px, both below 760px),
// one drawer open at a time, closed by the scrim, the close buttons or Escape.
// Loaded as a plain script before app.js: globalThis.gpt2chatPanels.
"use strict";

(function (root) {
  const $ = (id) => document.getElementById(id);
  const NARROW = root.matchMedia("(max-width: 760px)");   // both panels become drawers
  const MEDIUM = root.matchMedia("(max-width: 1099px)");  // the settings panel becomes a drawer

  // `settings` is the page's settings object (changed in place); `save()` stores it.
  // Returns { setPanel(name, open), isNarrow() } for app.js.
  function setupPanels(settings, save) {
    // Each setting is applied as soon as it is usable (while typing too); a value that is not usable is
    // replaced by the one still in force when the field is left.
    function bindSetting(id, key, read, show) {
      const input = $(id);
      const output = $(id + "-value");
      const display = () => { if (output) output.textContent = show ? show(settings[key]) : String(settings[key]); };
      if (input.type === "checkbox") input.checked = settings[key];
      else input.value = String(settings[key]);
      display();
      const apply = () => {
        const value = read(input);
        if (value === null) return false;
        settings[key] = value;
        display();
        save();
        return true;
      };
      input.addEventListener("input", apply);
      input.addEventListener("change", () => {
        if (!apply()) input.value = String(settings[key]);
      });
    }

    const number = (input) => (Number.isFinite(parseFloat(input.value)) ? parseFloat(input.value) : null);
    const count = (input) => {
      const value = parseInt(input.value, 10);
      return Number.isInteger(value) && value >= 1 ? value : null;
    };
    bindSetting("system", "system", (input) => input.value);
    bindSetting("temperature", "temperature", number, (v) => v.toFixed(2));
    bindSetting("top-p", "topP", number, (v) => v.toFixed(2));
    bindSetting("max-tokens", "maxTokens", count);
    bindSetting("truncate", "truncate", (input) => input.checked);
    bindSetting("api-key", "apiKey", (input) => input.value);

    function drawer(name) {
      return NARROW.matches || (name === "settings" && MEDIUM.matches);
    }

    function setPanel(name, open) {
      document.body.dataset[name] = open ? "open" : "closed";
      $("toggle-" + name).setAttribute("aria-expanded", String(open));
      const anyDrawer = ["sidebar", "settings"].some((n) => drawer(n) && document.body.dataset[n] === "open");
      $("scrim").hidden = !anyDrawer;
      if (name === "settings" && !drawer("settings")) {
        settings.settingsOpen = open;
        save();
      }
    }

    function layoutPanels() {
      setPanel("sidebar", !NARROW.matches);
      setPanel("settings", !MEDIUM.matches && settings.settingsOpen);
    }

    for (const name of ["sidebar", "settings"]) {
      $("toggle-" + name).addEventListener("click", () => {
        const open = document.body.dataset[name] !== "open";
        const other = name === "sidebar" ? "settings" : "sidebar";
        if (open && drawer(name) && drawer(other)) setPanel(other, false); // one drawer at a time
        setPanel(name, open);
      });
      $("close-" + name).addEventListener("click", () => setPanel(name, false));
    }
    $("scrim").addEventListener("click", () => {
      for (const name of ["sidebar", "settings"]) if (drawer(name)) setPanel(name, false);
    });
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Escape") return;
      for (const name of ["sidebar", "settings"]) if (drawer(name)) setPanel(name, false);
    });
    NARROW.addEventListener("change", layoutPanels);
    MEDIUM.addEventListener("change", layoutPanels);

    layoutPanels();
    return { setPanel, isNarrow: () => NARROW.matches };
  }

  root.gpt2chatPanels = { setupPanels };
})(globalThis);
