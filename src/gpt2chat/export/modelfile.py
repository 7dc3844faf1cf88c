"""An Ollama Modelfile for an exported GGUF file: the chat template in Go's template syntax, the stop
tokens and strings, and the model's context length.

Ollama does not run the Jinja `tokenizer.chat_template` of a GGUF file; it renders a Go `text/template`
over `.Messages` (each with `.Role` and `.Content`) and appends the assistant's turn itself. So each of
our chat templates has a Go twin here that renders the same text as `ChatTemplate.render_text(messages,
add_generation_prompt=True)` for a conversation ending in a user turn (tests/test_export.py checks this with
Go's own text/template when `go` is installed), leading system messages merged and later ones and tool
results in place as the Jinja does. An assistant's tool calls are not written: Ollama hands them over as
`.ToolCalls` objects, and Go's JSON is not Python's `json.dumps` text, so that part would not be the same
prompt. This module knows nothing about weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gpt2chat.export.source import write_atomically

if TYPE_CHECKING:
    from gpt2chat.templates import ChatTemplate

__all__ = ["GO_TEMPLATES", "modelfile_text", "write_modelfile"]

# Sets $sys (the leading system messages' contents joined by a blank line: the system part) and $leadEnd (the
# index of the last of them, -1 when there is none); messages after $leadEnd are rendered in place.
_SYSTEM_PART = (
    '{{- $sys := "" }}{{- $leadEnd := -1 }}{{- $inLead := true }}'
    '{{- range $i, $m := .Messages }}{{ if and $inLead (eq $m.Role "system") }}'
    '{{ if ge $leadEnd 0 }}{{ $sys = printf "%s\\n\\n%s" $sys $m.Content }}{{ else }}{{ $sys = $m.Content }}{{ end }}'
    "{{ $leadEnd = $i }}{{ else }}{{ $inLead = false }}{{ end }}{{ end }}"
)

_LLAMA3_CONTEXT = (
    _SYSTEM_PART
    + '{{- $lastUser := -1 }}{{- $lastRole := "" }}{{- $context := false }}'
    '{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}'
    "{{ $lastRole = $m.Role }}{{ end }}"
    "{{- range $i, $m := .Messages }}{{ if and (gt $i $leadEnd) (lt $i $lastUser) }}{{ $context = true }}{{ end }}"
    "{{ end }}"
    "<|begin_of_text|>"
    "{{- if ge $leadEnd 0 }}<|start_header_id|>system<|end_header_id|>{{ $sys }}<|eot_id|>{{ end }}"
    "{{- if $context }}<|start_context|>"
    "{{- range $i, $m := .Messages }}{{ if and (gt $i $leadEnd) (lt $i $lastUser) }}"
    "<|start_header_id|>{{ $m.Role }}<|end_header_id|>{{ $m.Content }}<|eot_id|>{{ end }}{{ end }}"
    "<|end_context|>{{ end }}"
    "{{- range $i, $m := .Messages }}{{ if and (ge $lastUser 0) (ge $i $lastUser) }}"
    "<|start_header_id|>{{ $m.Role }}<|end_header_id|>{{ $m.Content }}<|eot_id|>{{ end }}{{ end }}"
    '{{- if ne $lastRole "assistant" }}<|start_header_id|>assistant<|end_header_id|>{{ end }}'
)

_USER_ASSISTANT = (
    _SYSTEM_PART
    + '{{- $lastRole := "" }}'
    "{{- if ge $leadEnd 0 }}<|SYSTEM|> {{ $sys }} {{ end }}"
    '{{- range $i, $m := .Messages }}{{ if gt $i $leadEnd }}{{ if eq .Role "system" }}<|SYSTEM|> {{ .Content }} '
    '{{ else if eq .Role "user" }}<|USER|> {{ .Content }} '
    '{{ else if eq .Role "tool" }}<|USER|> Tool: {{ .Content }} '
    "{{ else }}<|ASSISTANT|> {{ .Content }}<|End|>{{ end }}{{ $lastRole = .Role }}{{ end }}{{ end }}"
    '{{- if ne $lastRole "assistant" }}<|ASSISTANT|>{{ end }}'
)


def _colon(user_tag: str, assistant_tag: str, system_tag: str, tool_tag: str) -> str:
    return (
        _SYSTEM_PART
        + '{{- $prev := "" }}'
        "{{- if ge $leadEnd 0 }}{{ $sys }}\n\n{{ end }}"
        '{{ range $i, $m := .Messages }}{{ if gt $i $leadEnd }}{{ if eq $prev "assistant" }}\n{{ end }}'
        f'{{{{ if eq .Role "user" }}}}{user_tag} {{{{ .Content }}}}\n'
        f'{{{{ else if eq .Role "system" }}}}{system_tag} {{{{ .Content }}}}\n'
        f'{{{{ else if eq .Role "tool" }}}}{tool_tag} {{{{ .Content }}}}\n'
        f"{{{{ else }}}}{assistant_tag} {{{{ .Content }}}}<|endoftext|>{{{{ end }}}}"
        "{{ $prev = .Role }}{{ end }}{{ end }}"
        f'{{{{- if ne $prev "assistant" }}}}{assistant_tag}{{{{ end }}}}'
    )


GO_TEMPLATES: dict[str, str] = {
    "llama3-context": _LLAMA3_CONTEXT,
    "user-assistant": _USER_ASSISTANT,
    "plain": _colon("User:", "Assistant:", "System:", "Tool:"),
    "guanaco": _colon("### Human:", "### Assistant:", "### System:", "### Tool:"),
}


def _quoted(value: str) -> str:
    """A Modelfile argument: "..." when it fits on one line, else Ollama's raw triple quotes."""
    if "\n" in value or '"' in value:
        if '"""' in value:
            raise ValueError(f"cannot quote {value!r} in a Modelfile")
        return f'"""{value}"""'
    return f'"{value}"'


def modelfile_text(gguf_ref: str, template: ChatTemplate, context_length: int) -> str:
    """The Modelfile text; `gguf_ref` is the GGUF file as FROM names it (relative to the Modelfile)."""
    go = GO_TEMPLATES.get(template.name)
    if go is None:
        raise ValueError(f"no Ollama (Go) template for chat template {template.name!r}")
    stops = list(dict.fromkeys([*template.stop_tokens, *template.stop_strings]))
    lines = [
        f"# Ollama Modelfile written by gpt2chat ({template.name} chat template).",
        "# Use: ollama create NAME -f THIS_FILE && ollama run NAME",
        f"FROM {gguf_ref}",
        f"TEMPLATE {_quoted(go)}",
        *[f"PARAMETER stop {_quoted(s)}" for s in stops],
        f"PARAMETER num_ctx {int(context_length)}",
    ]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_path: Path, template: ChatTemplate, context_length: int) -> Path:
    """Write the Modelfile for `gguf_path` at `path` (atomically)."""
    gguf_abs, folder = gguf_path.resolve(), path.resolve().parent
    ref = f"./{gguf_abs.relative_to(folder).as_posix()}" if gguf_abs.is_relative_to(folder) else str(gguf_abs)
    text = modelfile_text(ref, template, context_length)
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
