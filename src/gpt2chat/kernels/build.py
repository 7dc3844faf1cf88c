"""Compile csrc/*.cpp into one shared library once, into a cache folder, and say why when we cannot.

The library is built by one `g++` call (no ninja, no Python headers: it registers torch ops and has no
Python bindings) against the running torch's headers and libraries. Its file name carries a hash of the
source, the flags, the compiler and the torch version, so an upgrade of any of them builds a new one and
an old one is never loaded by mistake. Concurrent first uses (two test processes) wait on a file lock;
the library is written under a temporary name and renamed, so a half-written file is never loaded.

Cache folder: `$GPT2CHAT_KERNEL_CACHE`, else `$XDG_CACHE_HOME/gpt2chat/kernels`, else
`~/.cache/gpt2chat/kernels`. This module knows nothing about what the kernels compute.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(CSRC.glob("*.cpp")))  # linear.cpp, quantized.cpp (the linear ops), blocks.cpp (int4 search)
HEADERS = tuple(sorted(CSRC.glob("*.h")))
CPU_FLAGS = ("avx2", "fma", "f16c")
CPUINFO = Path("/proc/cpuinfo")  # where the CPU's flags are read (a test points it at a CPU without AVX2)
# -ffp-contract=off: csrc/blocks.cpp repeats torch's roundings step by step; the kernels' FMAs are intrinsics
CXX_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off",
             "-DNDEBUG", "-w"]
BUILD_TIMEOUT_S = 600


class KernelBuildError(RuntimeError):
    """The native kernels cannot be built or loaded here; the message says why in one line."""


def cache_dir() -> Path:
    explicit = os.environ.get("GPT2CHAT_KERNEL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpt2chat" / "kernels"


def unsupported_reason() -> str | None:
    """Why this machine cannot run the native kernels (None when it can), without building anything."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they are built for Linux on x86-64, this is {platform.system()} on {platform.machine()}"
    try:
        flags = next(
            (line.split(":", 1)[1].split() for line in CPUINFO.read_text().splitlines()
             if line.startswith("flags")), [],
        )  # fmt: skip
    except OSError:
        flags = []
    missing = [flag for flag in CPU_FLAGS if flag not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise KernelBuildError(f"no C++ compiler found ({os.environ.get('CXX', 'g++')} is not on PATH)")
    return compiler


def _command(compiler: str, output: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    lib_dir = cpp_extension.library_paths()[0]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [compiler, *CXX_FLAGS, abi, *includes, *map(str, SOURCES), f"-L{lib_dir}", "-lc10", "-ltorch_cpu",
            f"-Wl,-rpath,{lib_dir}", "-o", str(output)]  # fmt: skip


def library_path() -> Path:
    """The cached library for this source, compiler and torch; built first if it is not there yet."""
    import fcntl

    import torch

    compiler = _compiler()
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(" ".join([compiler, *CXX_FLAGS, torch.__version__]).encode())
    folder = cache_dir()
    target = folder / f"gpt2chat_linear-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same library
            if not target.is_file():
                _compile(compiler, target)
    except OSError as exc:
        raise KernelBuildError(f"cannot write the kernel cache {folder} ({exc})") from exc
    return target


def _compile(compiler: str, target: Path) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        result = subprocess.run(_command(compiler, tmp), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise KernelBuildError(f"{Path(compiler).name} failed on {CSRC.name}/*.cpp: {last}")
        os.replace(tmp, target)
    except subprocess.TimeoutExpired as exc:
        raise KernelBuildError(f"compiling {CSRC.name}/*.cpp took over {BUILD_TIMEOUT_S} s") from exc
    finally:
        tmp.unlink(missing_ok=True)
