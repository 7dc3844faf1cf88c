"""Export a checkpoint for other runners: one GGUF file (llama.cpp, Ollama, LM Studio) or a clean HF folder.

```python
from gpt2chat.export import export_gguf, export_hf, write_gguf
export_gguf("runs/orpo/final", "chat.gguf", quant="q8_0", adapter=None, force=False)
export_hf("runs/sft/final", "merged/", adapter="runs/lora/final")
write_gguf(model, tokenizer, "chat.gguf", quant="f32", template="llama3-context")   # a model in memory
```

`source` loads the checkpoint (an adapter merged first) and guards the output path; `gguf_file` writes the
GGUF file; `modelfile` writes an Ollama Modelfile for it; `hf` writes the folder. See docs/EXPORT.md.
"""

from __future__ import annotations

from gpt2chat._lazy import lazy_getattr

_LAZY = {
    "ExportError": ("gpt2chat.export.source", "ExportError"),
    "GGUF_TYPES": ("gpt2chat.export.gguf_file", "GGUF_TYPES"),
    "export_gguf": ("gpt2chat.export.gguf_file", "export_gguf"),
    "gguf_chat_template": ("gpt2chat.export.gguf_file", "gguf_chat_template"),
    "write_gguf": ("gpt2chat.export.gguf_file", "write_gguf"),
    "export_hf": ("gpt2chat.export.hf", "export_hf"),
    "write_modelfile": ("gpt2chat.export.modelfile", "write_modelfile"),
}
__all__ = sorted(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY, globals())
