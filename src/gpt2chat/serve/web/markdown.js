// gpt2chat web page: our small Markdown renderer, text in, HTML string out.
//
// Safety rule: the whole input is HTML-escaped before any Markdown is recognised, so the only tags in the
// output are the ones this file writes (p br strong em del code pre div span button a h1-h6 ul ol li
// blockquote hr table thead tbody tr th td), with no attributes but class, start, type, href, target and
// rel. A link's target must be http(s), mailto or a relative address; anything else (javascript:, data:,
// ...) stays text. What it covers: paragraphs, line breaks, headings, lists (nested, ordered with a start),
// block quotes, rules, fenced code blocks (with a copy button; an unclosed fence runs to the end, which is
// what a reply still streaming looks like), GitHub tables, emphasis, strike, inline code, links and bare
// URLs. It knows nothing about the page: app.js decides where the HTML goes and what the buttons do.
// Loaded as a plain script in the page (globalThis.gpt2chatMarkdown) and with require() in the node tests.
(function (root) {
  "use strict";

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const UNESCAPES = { "&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'" };

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  function unescapeHtml(html) {
    return html.replace(/&(?:amp|lt|gt|quot|#39);/g, (e) => UNESCAPES[e]);
  }

  // An escaped link target -> the same string if it is safe to put in href, else null. Anything with a
  // colon before its first / ? # has a scheme, and only http, https and mailto are allowed; browsers drop
  // tabs and newlines inside a scheme ("java\tscript:"), which this rule refuses as well.
  function safeHref(escapedUrl) {
    const url = unescapeHtml(escapedUrl);
    if (/^(?:https?:\/\/|mailto:)/i.test(url)) return escapedUrl;
    if (/^[^/?#]*:/.test(url) || /[\u0000-\u001f\s]/.test(url)) return null;
    return url ? escapedUrl : null;
  }

  // Placeholders keep finished pieces (code spans, links) away from the emphasis rules. The input cannot
  // forge one: \u0000 and \u0001 are replaced before anything else.
  function stash(store, html) {
    store.push(html);
    return "\u0000" + (store.length - 1) + "\u0001";
  }

  function unstash(store, text) {
    let out = text;
    // a stashed piece may hold placeholders of its own (a link around inline code)
    for (let depth = 0; depth < 3 && out.indexOf("\u0000") >= 0; depth++) {
      out = out.replace(/\u0000(\d+)\u0001/g, (_, i) => store[Number(i)]);
    }
    return out;
  }

  function link(store, label, href) {
    return stash(store, '<a href="' + href + '" target="_blank" rel="noopener noreferrer nofollow">' +
      label + "</a>");
  }

  // URL characters of escaped text: entities other than &amp; end a URL (they were < > " ' in the input).
  const BARE_URL = /\bhttps?:\/\/(?:[^\s&\u0000\u0001]|&amp;)+/g;

  function emphasis(text) {
    return text
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>")
      .replace(/\*(?=[^\s*])([^*]*?[^\s*]|[^\s*])\*/g, "<em>$1</em>")
      .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_]|[^\s_])_(?!\w)/g, "$1<em>$2</em>");
  }

  // Inline Markdown of one block of ALREADY ESCAPED text.
  function inline(escaped, store) {
    let text = escaped.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) => {
      const body = /^ [\s\S]* $/.test(code) && code.trim() ? code.slice(1, -1) : code;
      return stash(store, "<code>" + body.replace(/\n/g, " ") + "</code>");
    });
    text = text.replace(/\[([^\]\n]+)\]\(([^()\s]+)\)/g, (whole, label, url) => {
      const href = safeHref(url);
      return href === null ? whole : link(store, emphasis(label), href);
    });
    text = text.replace(BARE_URL, (url) => {
      const trail = /[.,;:!?)\]]+$/.exec(url);
      const core = trail ? url.slice(0, -trail[0].length) : url;
      return link(store, core, core) + (trail ? trail[0] : "");
    });
    return unstash(store, emphasis(text).replace(/\n/g, "<br>"));
  }

  // ---- blocks (all on escaped lines) -------------------------------------------------------------------

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}&gt; ?(.*)$/;
  const ITEM = /^( *)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
  const TABLE_RULE = /^ *\|? *:?-+:? *(?:\| *:?-+:? *)*\|? *$/;

  function isBlank(line) {
    return /^\s*$/.test(line);
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
  }

  // As in CommonMark, an ordered list interrupts a paragraph only when it starts at 1 ("In 2023. we ..."
  // stays text).
  function interruptsParagraph(line) {
    const item = ITEM.exec(line);
    if (item && /\d/.test(item[2])) return parseInt(item[2], 10) === 1;
    return startsBlock(line);
  }

  function cells(line) {
    let row = line.trim();
    if (row.startsWith("|")) row = row.slice(1);
    if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
    return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
  }

  function codeBlock(lang, lines) {
    const label = lang ? '<span class="code-lang">' + lang + "</span>" : '<span class="code-lang"></span>';
    return '<div class="code-block"><div class="code-head">' + label +
      '<button type="button" class="copy-code">Copy</button></div><pre><code>' +
      lines.join("\n") + "</code></pre></div>";
  }

  function table(lines, store) {
    const head = cells(lines[0]);
    const aligns = cells(lines[1]).map((spec) =>
      spec.startsWith(":") && spec.endsWith(":") ? "center" : spec.endsWith(":") ? "right" :
        spec.startsWith(":") ? "left" : "");
    const cell = (tag, text, i) => "<" + tag + (aligns[i] ? ' class="align-' + aligns[i] + '"' : "") + ">" +
      inline(text, store) + "</" + tag + ">";
    let html = "<table><thead><tr>" + head.map((t, i) => cell("th", t, i)).join("") + "</tr></thead><tbody>";
    for (const row of lines.slice(2)) {
      const values = cells(row);
      html += "<tr>" + head.map((_, i) => cell("td", values[i] || "", i)).join("") + "</tr>";
    }
    return html + "</tbody></table>";
  }

  // A list starting at lines[start]: returns [html, next line index]. Items are split at markers with the
  // first item's indent; deeper lines belong to the item and are rendered as blocks of their own.
  function list(lines, start, store) {
    const first = ITEM.exec(lines[start]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const items = [];
    let loose = false;
    let i = start;
    while (i < lines.length) {
      const line = lines[i];
      const item = ITEM.exec(line);
      if (item && item[1].length <= indent + 1) {
        if (/\d/.test(item[2]) !== ordered) break;
        items.push({ width: item[1].length + item[2].length + 1, lines: [item[3]] });
        i++;
        continue;
      }
      if (isBlank(line)) {
        // a blank line continues the list only if an indented line or another item follows
        let next = i + 1;
        while (next < lines.length && isBlank(lines[next])) next++;
        if (next >= lines.length) break;
        const again = ITEM.exec(lines[next]);
        const nested = /^ */.exec(lines[next])[0].length > indent;
        if (!(nested || (again && again[1].length <= indent + 1 && /\d/.test(again[2]) === ordered))) break;
        if (!nested || !ITEM.exec(lines[next])) loose = true;
        for (; i < next; i++) items[items.length - 1].lines.push("");
        continue;
      }
      const spaces = /^ */.exec(line)[0].length;
      if (spaces > indent) {
        const current = items[items.length - 1];
        current.lines.push(line.slice(Math.min(spaces, current.width)));
        i++;
        continue;
      }
      if (startsBlock(line)) break;
      items[items.length - 1].lines.push(line.trim()); // lazy continuation of the item's paragraph
      i++;
    }
    const startNumber = ordered ? parseInt(first[2], 10) : 1;
    let html = ordered ? (startNumber !== 1 ? '<ol start="' + startNumber + '">' : "<ol>") : "<ul>";
    for (const item of items) {
      let body = blocks(item.lines, store);
      if (!loose) body = body.replace(/^<p>([\s\S]*?)<\/p>/, "$1");
      html += "<li>" + body + "</li>";
    }
    return [html + (ordered ? "</ol>" : "</ul>"), i];
  }

  function blocks(lines, store) {
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let match;
      if (isBlank(line)) {
        i++;
      } else if ((match = FENCE.exec(line))) {
        const fence = match[1];
        const body = [];
        i++;
        while (i < lines.length && !new RegExp("^ {0,3}" + fence[0] + "{" + fence.length + ",}\\s*$").test(lines[i])) {
          body.push(lines[i]);
          i++;
        }
        i++; // the closing fence (or the end of a reply still streaming)
        out.push(codeBlock(match[2], body));
      } else if ((match = HEADING.exec(line))) {
        const level = match[1].length;
        out.push("<h" + level + ">" + inline(match[2] || "", store) + "</h" + level + ">");
        i++;
      } else if (RULE.test(line)) {
        out.push("<hr>");
        i++;
      } else if (QUOTE.test(line)) {
        const quoted = [];
        while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
          quoted.push(match[1]);
          i++;
        }
        out.push("<blockquote>" + blocks(quoted, store) + "</blockquote>");
      } else if (ITEM.test(line)) {
        const [html, next] = list(lines, i, store);
        out.push(html);
        i = next;
      } else if (line.indexOf("|") >= 0 && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) &&
                 lines[i + 1].indexOf("-") >= 0) {
        const rows = [line, lines[i + 1]];
        i += 2;
        while (i < lines.length && !isBlank(lines[i]) && lines[i].indexOf("|") >= 0) {
          rows.push(lines[i]);
          i++;
        }
        out.push(table(rows, store));
      } else {
        const paragraph = [line.trim()];
        i++;
        while (i < lines.length && !isBlank(lines[i]) && !interruptsParagraph(lines[i])) {
          paragraph.push(lines[i].trim());
          i++;
        }
        out.push("<p>" + inline(paragraph.join("\n"), store) + "</p>");
      }
    }
    return out.join("");
  }

  function renderMarkdown(text) {
    const clean = String(text == null ? "" : text).replace(/\r\n?/g, "\n").replace(/[\u0000\u0001]/g, "\ufffd");
    return blocks(escapeHtml(clean).split("\n"), []);
  }

  const api = { renderMarkdown, escapeHtml, safeHref };
  if (typeof module === "object" && module.exports) module.exports = api;
  else root.gpt2chatMarkdown = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
