"""Import every module of gpt2chat and benchmarks/, and every peer the tests compare with; name each failure.

    .venv-newest/bin/python .ci/imports.py

The newest-versions job of .ci/run runs it first: the tests skip a peer that does not import
(`pytest.importorskip`), so a release that breaks an import would otherwise read as a skip, not a failure.
Exits 1 when anything failed to import.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback

PEERS = ("torch", "numpy", "safetensors", "tokenizers", "tiktoken", "huggingface_hub", "jinja2", "matplotlib",
         "sacrebleu", "fastapi", "uvicorn", "pydantic", "telegram", "prometheus_client", "gguf", "httpx",
         "transformers", "trl", "trl.experimental.orpo", "peft", "datasets", "pyarrow", "openai", "langchain_openai",
         "playwright.sync_api", "schemathesis", "lm_eval", "pytest")


def modules(package: str) -> list[str]:
    root = importlib.import_module(package)
    return [package] + [m.name for m in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")]


def main() -> int:
    failed = []
    names = list(PEERS)
    for package in ("gpt2chat", "benchmarks"):
        try:
            names += modules(package)
        except Exception as exc:  # noqa: BLE001 - reported by name
            failed.append((package, exc))
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - reported by name
            failed.append((name, exc))
    for name, exc in failed:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"import failed: {name}: {type(exc).__name__}: {exc} ({where.filename}:{where.lineno})")
    print(f"imports: {len(names) - len(failed)} of {len(names)} modules import")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
