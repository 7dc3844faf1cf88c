"""An Ollama Modelfile for an exported GGUF file: the chat template in Go's template syntax, the stop
tokens and strings, and the model's context length.

Ollama does not run the Jinja `tokenizer.chat_template` of a GGUF file; it renders a Go `text/template`
over `.Messages` (each with `.Role` and `.Content`) and appends the assistant's turn itself. So each of
our chat templates has a Go twin here that renders the same text as `ChatTemplate.render_text(messages,
add_generation_prompt=True)` for a conversation ending in a user turn (tests/test_export.py checks this with
Go's own text/template when `go` is installed). This module knows nothing about weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gpt2chat.export.source import write_atomically

if TYPE_CHECKING:
    from gpt2chat.templates import ChatTemplate

__all__ = ["GO_TEMPLATES", "modelfile_text", "write_modelfile"]

_LLAMA3_CONTEXT = (
    '{{- $lastUser := -1 }}{{- $start := 0 }}{{- $lastRole := "" }}'
    '{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}'
    "{{ $lastRole = $m.Role }}{{ end }}"
    "<|begin_of_text|>"
    '{{- range $i, $m := .Messages }}{{ if and (eq $i 0) (eq $m.Role "system") }}'
    "<|start_header_id|>system<|end_header_id|>{{ $m.Content }}<|eot_id|>{{ $start = 1 }}{{ end }}{{ end }}"
    "{{- if gt $lastUser $start }}<|start_context|>"
    "{{- range $i, $m := .Messages }}{{ if and (ge $i $start) (lt $i $lastUser) }}"
    "<|start_header_id|>{{ $m.Role }}<|end_header_id|>{{ $m.Content }}<|eot_id|>{{ end }}{{ end }}"
    "<|end_context|>{{ end }}"
    "{{- range $i, $m := .Messages }}{{ if and (ge $lastUser 0) (ge $i $lastUser) }}"
    "<|start_header_id|>{{ $m.Role }}<|end_header_id|>{{ $m.Content }}<|eot_id|>{{ end }}{{ end }}"
    '{{- if ne $lastRole "assistant" }}<|start_header_id|>assistant<|end_header_id|>{{ end }}'
)

_USER_ASSISTANT = (
    '{{- $lastRole := "" }}'
    '{{- range .Messages }}{{ if eq .Role "system" }}<|SYSTEM|> {{ .Content }} '
    '{{ else if eq .Role "user" }}<|USER|> {{ .Content }} '
    "{{ else }}<|ASSISTANT|> {{ .Content }}<|End|>{{ end }}{{ $lastRole = .Role }}{{ end }}"
    '{{- if ne $lastRole "assistant" }}<|ASSISTANT|>{{ end }}'
)


def _colon(user_tag: str, assistant_tag: str) -> str:
    return (
        '{{- $prev := "" }}'
        '{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
        '{{ else }}{{ if eq $prev "assistant" }}\n{{ end }}'
        f'{{{{ if eq .Role "user" }}}}{user_tag} {{{{ .Content }}}}\n'
        f"{{{{ else }}}}{assistant_tag} {{{{ .Content }}}}<|endoftext|>{{{{ end }}}}{{{{ end }}}}"
        "{{ $prev = .Role }}{{ end }}"
        f'{{{{- if ne $prev "assistant" }}}}{assistant_tag}{{{{ end }}}}'
    )


GO_TEMPLATES: dict[str, str] = {
    "llama3-context": _LLAMA3_CONTEXT,
    "user-assistant": _USER_ASSISTANT,
    "plain": _colon("User:", "Assistant:"),
    "guanaco": _colon("### Human:", "### Assistant:"),
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
