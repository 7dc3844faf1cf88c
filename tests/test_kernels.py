"""gpt2chat.kernels: every linear op equals a float64 reference on both CPU paths, the portable kernels too;
torch.compile traces the ops; the build falls back with one warning line when it cannot happen."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gpt2chat import kernels
from gpt2chat.kernels import INT8_GROUP, gather_rows, pack_rows, portable, unpack_rows
from gpt2chat.kernels.build import unsupported_reason

# (N, K): rows / columns that are not multiples of the 4-row block or the 8-wide vector, and 124M shapes
SHAPES = [(1, 5), (3, 8), (37, 67), (131, 769), (768, 768), (2304, 768)]
ROWS = [1, 2, 3, 5, 16, 33, 64, 65, 512]  # every tail of the register blocks (3 or 2 input rows a pass), both sides of 64
FORMATS = ["f32", "f16", "i8"]
# fp32 accumulation in any order: |error| <= K * 2^-24 * sum|x||w| in the worst case, ~sqrt(K) * 2^-24 typical
TOLERANCE = 2e-5


def _weights(fmt: str, n: int, k: int, generator: torch.Generator):
    """(args for the op after x, the float64 weight they stand for)."""
    dense = torch.randn(n, k, generator=generator)
    if fmt == "f32":
        return (dense,), dense.double()
    if fmt == "f16":
        half = dense.half()
        return (pack_rows(half).view(torch.int16), n), half.double()
    quantized = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    # a different scale for every group of 32 columns: a kernel that applied one group's scale to another
    # (or one per row) is off by far more than TOLERANCE
    scale = torch.rand(n, -(-k // INT8_GROUP), generator=generator) + 0.01
    per_weight = scale.double().repeat_interleave(INT8_GROUP, dim=1)[:, :k]
    return (pack_rows(quantized), scale), quantized.double() * per_weight


def _op(fmt: str):
    return getattr(torch.ops.gpt2chat, f"linear_{fmt}")


def _portable(fmt: str):
    return {"f32": portable.linear_f32, "f16": portable.linear_f16, "i8": portable.linear_i8}[fmt]


def _check(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None) -> None:
    x64 = x.double().reshape(-1, x.shape[-1])
    ref = x64 @ dense.T + (0 if bias is None else bias.double())
    bound = x64.abs() @ dense.abs().T + (0 if bias is None else bias.double().abs())
    err = (y.double().reshape(ref.shape) - ref).abs()
    worst = (err - TOLERANCE * bound).max().item()
    assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], dense.shape[0])
    assert worst <= 1e-6, f"max error {err.max().item():.3g} over tolerance"


@pytest.fixture(scope="module")
def native() -> bool:
    """True when the native CPU kernels are loaded (they must be wherever this machine can build them)."""
    backend = kernels.load()
    if unsupported_reason() is None and os.environ.get("GPT2CHAT_KERNELS", "") != "portable":
        assert backend == "native", "this CPU can run the native kernels, but they did not load"
    return backend == "native"


def test_native_kernels_are_the_cpu_implementation(native):
    if not native:
        pytest.skip(f"native kernels unavailable: {unsupported_reason()}")
    for fmt in FORMATS + Q_FORMATS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gpt2chat::linear_{fmt}", "CPU")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", ["default", "one-pass", "widened-tiles"])
def test_native_matches_float64(native, fmt, path):
    """Every M of decode, batched decode and prefill, odd shapes, with and without bias; `small_m_max`
    forces the one-pass kernel (every M) or the tiled sgemm path (every M), besides the built-in choice."""
    if not native:
        pytest.skip(f"native kernels unavailable: {unsupported_reason()}")
    small_m_max = {"default": -1, "one-pass": 1 << 20, "widened-tiles": 0}[path]
    generator = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        weights, dense = _weights(fmt, n, k, generator)
        for m in ROWS:
            if n * k * m > 2304 * 768 * 64:
                continue  # the largest shapes at M=512 add nothing but time
            x = torch.randn(m, k, generator=generator)
            for bias in (None, torch.randn(n, generator=generator)):
                y = _op(fmt)(x, *weights, bias, small_m_max)
                _check(y, x, dense, bias)


@pytest.mark.parametrize("fmt", FORMATS)
def test_portable_matches_float64(fmt, monkeypatch):
    """The fallback kernels (CUDA, no compiler, no AVX2), including the chunking of a tall weight."""
    monkeypatch.setattr(portable, "CHUNK_ELEMENTS", 1000)  # forces several chunks below
    generator = torch.Generator().manual_seed(1)
    for n, k in [(1, 5), (37, 67), (131, 769)]:
        weights, dense = _weights(fmt, n, k, generator)
        for m in ROWS:
            x = torch.randn(m, k, generator=generator)
            for bias in (None, torch.randn(n, generator=generator)):
                _check(_portable(fmt)(x, *weights, bias), x, dense, bias)


def test_leading_dimensions_and_strided_input(native):
    generator = torch.Generator().manual_seed(2)
    for fmt in FORMATS:
        weights, dense = _weights(fmt, 45, 70, generator)
        x = torch.randn(2, 3, 70, generator=generator)
        _check(_op(fmt)(x, *weights, None), x, dense, None)
        strided = torch.randn(70, 5, generator=generator).t()  # not contiguous
        _check(_op(fmt)(strided, *weights, None), strided, dense, None)


def test_bad_arguments_are_refused(native):
    x = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match="features|shape|size"):
        torch.ops.gpt2chat.linear_f32(x, torch.randn(4, 11), None)
    if native:
        with pytest.raises(RuntimeError, match="int8"):
            torch.ops.gpt2chat.linear_i8(x, pack_rows(torch.randn(4, 10)), torch.ones(4, 1), None)
        with pytest.raises(RuntimeError, match=r"packed 4x8 for 5 outputs and 10 features, i.e. \[2, 2, 4, 8\]"):
            torch.ops.gpt2chat.linear_i8(x, torch.zeros(5, 10, dtype=torch.int8), torch.ones(5, 1), None)
        with pytest.raises(RuntimeError, match=r"scale must be a contiguous float32 \[N, 1\] matrix"):
            torch.ops.gpt2chat.linear_i8(x, pack_rows(torch.zeros(4, 10, dtype=torch.int8)), torch.ones(4), None)
        with pytest.raises(RuntimeError, match="bias must be a contiguous float32 vector of 4"):
            torch.ops.gpt2chat.linear_f16(x, pack_rows(torch.zeros(4, 10).half()).view(torch.int16), 4,
                                          torch.ones(3))  # fmt: skip


def test_packing_round_trips():
    generator = torch.Generator().manual_seed(6)
    for n, k in [(1, 1), (5, 9), (37, 67), (8, 16)]:
        dense = torch.randn(n, k, generator=generator)
        packed = pack_rows(dense)
        assert packed.shape == (-(-n // 4), -(-k // 8), 4, 8)
        assert torch.equal(unpack_rows(packed, k, 0, n), dense)
        if n > 4:
            assert torch.equal(unpack_rows(packed, k, 4, n), dense[4:])
        ids = torch.tensor([[n - 1, 0], [n // 2, n - 1]])
        assert torch.equal(gather_rows(packed, k, ids), dense[ids])
        full = unpack_rows(packed, packed.shape[1] * 8)  # every stored row and column: the padding is zeros
        assert torch.equal(full[:n, :k], dense) and not full[n:].any() and not full[:, k:].any()


def test_ops_trace_under_torch_compile(native):
    """fullgraph=True fails on any graph break: the fake kernels let dynamo / AOT trace through the ops."""
    generator = torch.Generator().manual_seed(3)
    q = pack_rows(torch.randint(-127, 128, (33, 40), generator=generator, dtype=torch.int8))
    scale = torch.rand(33, 2, generator=generator)
    half = pack_rows(torch.randn(40, 33, generator=generator).half()).view(torch.int16)
    dense = torch.randn(33, 40, generator=generator)

    def step(x):
        h = torch.ops.gpt2chat.linear_i8(x, q, scale, None)
        h = torch.ops.gpt2chat.linear_f16(torch.relu(h), half, 40, None)
        return torch.ops.gpt2chat.linear_f32(h, dense, None)

    x = torch.randn(2, 1, 40, generator=generator)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert out.shape == (2, 1, 33)
    torch.testing.assert_close(out, step(x))


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})  # fmt: skip


PROBE = (
    "import torch\nfrom gpt2chat import kernels\nprint(kernels.load())\n"
    "x, w = torch.randn(3, 9), torch.randn(5, 9)\n"
    "assert torch.allclose(torch.ops.gpt2chat.linear_f32(x, w, None), x @ w.T, atol=1e-5)\n"
)


def test_forced_portable_skips_the_build(tmp_path):
    result = _run_python(PROBE, GPT2CHAT_KERNELS="portable", GPT2CHAT_KERNEL_CACHE=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["portable"]
    assert "unavailable" not in result.stderr and not list(tmp_path.iterdir())


def test_missing_compiler_falls_back_with_one_warning_line(tmp_path):
    result = _run_python(PROBE, CXX="no-such-compiler-gpt2chat", GPT2CHAT_KERNEL_CACHE=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["portable"]
    warnings = [line for line in result.stderr.splitlines() if "native CPU kernels unavailable" in line]
    assert len(warnings) == 1
    reason = unsupported_reason() or "no C++ compiler found"
    assert reason in warnings[0]


def test_cpu_without_avx2_falls_back_once_and_every_op_runs(tmp_path):
    """A CPU that lacks AVX2 gets the portable kernels of every format (no build), one warning line that
    names the missing flag however often `load` is called, and the ops still compute."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 fma f16c\n")
    code = (
        f"from pathlib import Path\nfrom gpt2chat.kernels import build\nbuild.CPUINFO = Path({str(cpuinfo)!r})\n"
        "import torch\nfrom gpt2chat import kernels\nfrom gpt2chat.kernels.blocks import quantize_int4\n"
        "print(kernels.load(), kernels.load(), kernels.backend())\n"
        "x, w = torch.randn(3, 64), torch.randn(8, 64)\n"
        "packed, scales = kernels.pack_int4(*quantize_int4(w))\n"
        "y = torch.ops.gpt2chat.linear_i4_q8(x, packed, scales, 8)\n"
        "print(bool(((y - x @ w.T).norm() / (x @ w.T).norm()) < 0.3))\n"
    )
    cache = tmp_path / "cache"
    result = _run_python(code, GPT2CHAT_KERNEL_CACHE=str(cache))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["portable"] * 3 + ["True"]
    warnings = [line for line in result.stderr.splitlines() if "native CPU kernels unavailable" in line]
    assert len(warnings) == 1 and "lacks avx2" in warnings[0]
    assert not cache.exists() or not list(cache.iterdir())  # nothing was built


def test_ops_header_functions_are_exported_from_the_library(native):
    """csrc/ops.h's five functions are global symbols of the built library with the declared signatures,
    so another .cpp of the library (the fused decode step) links against them."""
    import re
    import shutil

    from gpt2chat.kernels.build import CSRC, library_path

    if not native:
        pytest.skip(f"native kernels unavailable: {unsupported_reason()}")
    if shutil.which("nm") is None:
        pytest.skip("no nm to list the library's symbols")
    declared = re.findall(r"^at::Tensor (linear_\w+)\(", (CSRC / "ops.h").read_text(), flags=re.M)
    assert declared == ["linear_f32", "linear_f16", "linear_i8", "linear_i8_q8", "linear_i4_q8"]
    symbols = subprocess.run(["nm", "-DC", "--defined-only", str(library_path())], capture_output=True, text=True,
                             check=True).stdout
    exported = {line.split(" ", 2)[2] for line in symbols.splitlines() if " T gpt2chat_kernels::linear_" in line}
    tensor, optional = "at::Tensor const&", "std::optional<at::Tensor> const&"
    assert exported == {
        f"gpt2chat_kernels::linear_f32({tensor}, {tensor}, {optional}, long)",
        f"gpt2chat_kernels::linear_f16({tensor}, {tensor}, long, {optional}, long)",
        f"gpt2chat_kernels::linear_i8({tensor}, {tensor}, {tensor}, {optional}, long)",
        f"gpt2chat_kernels::linear_i8_q8({tensor}, {tensor}, {tensor}, {optional}, long)",
        f"gpt2chat_kernels::linear_i4_q8({tensor}, {tensor}, {tensor}, long, {optional}, long)",
    }


# ---------------------------------------------------------------------------- int8 activations (q8 blocks)
Q_FORMATS = ["i8_q8", "i4_q8"]
# every tail of the register block (4 input rows a pass) and both sides of the old 64-row switch to sgemm
Q_ROWS = [1, 2, 3, 5, 16, 33, 64, 65, 512]


def _q_weights(fmt: str, n: int, k: int, generator: torch.Generator):
    """(args for the op after x, the float64 weight they stand for) for the integer-product ops."""
    groups = -(-k // INT8_GROUP)
    if fmt == "i8_q8":
        (packed, scale), dense = _weights("i8", n, k, generator)
        return (packed, scale), dense
    q = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    scale = ((torch.rand(n, groups, generator=generator) + 0.01) * torch.where(
        torch.rand(n, groups, generator=generator) < 0.5, -1.0, 1.0)).half()  # Q4_0 scales carry a sign
    per_weight = scale.double().repeat_interleave(INT8_GROUP, dim=1)[:, :k]
    return (*kernels.pack_int4(q, scale), n), (q.double() - kernels.INT4_ZERO) * per_weight


def test_activation_rounding_is_q8_0s():
    """q8(x): per block of 32, d = max|x| / 127 and q = round(x / d) in [-127, 127]; a zero block stays zero."""
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(5))
    x[1, 32:64] = 0.0
    rounded = portable.quantize_activations(x)
    padded = torch.nn.functional.pad(x, (0, 26)).view(3, 3, 32)
    d = padded.abs().amax(-1, keepdim=True) / 127
    q = (torch.nn.functional.pad(rounded, (0, 26)).view(3, 3, 32) / torch.where(d > 0, d, 1)).double()
    assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 127 + 1e-4
    assert torch.all((rounded - x).abs() <= (d.repeat_interleave(32, -1).flatten(1)[:, :70] / 2) * (1 + 1e-5))
    assert torch.all(rounded[1, 32:64] == 0)


@pytest.mark.parametrize("fmt", Q_FORMATS)
@pytest.mark.parametrize("path", ["default", "one-pass", "widened-tiles"])
def test_integer_kernels_match_portable_and_float64(native, fmt, path):
    """The native integer kernels (one pass, and the widened sgemm past `small_m_max`) compute q8(x) W^T
    exactly up to fp32 sums: they equal the portable kernel and a float64 product of the rounded x."""
    if not native:
        pytest.skip(f"native kernels unavailable: {unsupported_reason()}")
    small_m_max = {"default": -1, "one-pass": 1 << 20, "widened-tiles": 0}[path]
    generator = torch.Generator().manual_seed(6)
    op = getattr(torch.ops.gpt2chat, f"linear_{fmt}")
    for n, k in SHAPES:
        weights, dense = _q_weights(fmt, n, k, generator)
        for m in Q_ROWS:
            if n * k * m > 2304 * 768 * 64:
                continue
            x = torch.randn(m, k, generator=generator) * torch.rand(m, 1, generator=generator) * 4
            for bias in (None, torch.randn(n, generator=generator)):
                y = op(x, *weights, bias, small_m_max)
                _check(y, portable.quantize_activations(x), dense, bias)
                scale = y.abs().max().item()
                torch.testing.assert_close(y, getattr(portable, f"linear_{fmt}")(x, *weights, bias), rtol=1e-5,
                                           atol=1e-5 * scale)


@pytest.mark.parametrize("fmt", Q_FORMATS)
def test_integer_kernel_rows_do_not_depend_on_the_batch(native, fmt):
    """A row's output is the same bits whichever register block and tail it falls in (M = 1 .. 13), so a
    batched decode step gives each stream exactly its batch-1 logits."""
    if not native:
        pytest.skip(f"native kernels unavailable: {unsupported_reason()}")
    generator = torch.Generator().manual_seed(9)
    op = getattr(torch.ops.gpt2chat, f"linear_{fmt}")
    weights, _ = _q_weights(fmt, 37, 200, generator)
    bias = torch.randn(37, generator=generator)
    x = torch.randn(13, 200, generator=generator)
    alone = torch.cat([op(x[i : i + 1], *weights, bias, -1) for i in range(13)])
    for m in range(1, 14):
        assert torch.equal(op(x[:m], *weights, bias, -1), alone[:m]), f"M = {m}"


@pytest.mark.parametrize("fmt", Q_FORMATS)
def test_portable_integer_ops_match_float64(fmt, monkeypatch):
    monkeypatch.setattr(portable, "CHUNK_ELEMENTS", 1000)
    generator = torch.Generator().manual_seed(7)
    for n, k in [(1, 5), (37, 67), (131, 769)]:
        weights, dense = _q_weights(fmt, n, k, generator)
        for m in (1, 3, 16, 65):
            x = torch.randn(m, k, generator=generator)
            _check(getattr(portable, f"linear_{fmt}")(x, *weights, None), portable.quantize_activations(x), dense, None)


def test_int4_packing_round_trips():
    generator = torch.Generator().manual_seed(8)
    q = torch.randint(0, 16, (37, 67), generator=generator, dtype=torch.uint8)
    scale = torch.randn(37, 3, generator=generator).half()
    packed, scales = kernels.pack_int4(q, scale)
    assert packed.shape == (10, 3, 64) and scales.shape == (10, 3, 4) and scales.dtype == torch.int16
    assert torch.equal(kernels.unpack_int4(packed, 67)[:37], q)
    assert torch.all(kernels.unpack_int4(packed, 96)[37:] == kernels.INT4_ZERO)  # padding is weight 0
    assert torch.equal(kernels.unpack_int4_scales(scales)[:37], scale)
    ids = torch.tensor([[0, 36], [5, 4]])
    expected = (q.float() - 8) * scale.float().repeat_interleave(32, dim=1)[:, :67]
    torch.testing.assert_close(kernels.gather_int4_rows(packed, scales, 67, ids), expected[ids])


def test_integer_ops_refuse_bad_layouts(native):
    x = torch.randn(2, 64)
    packed, scales = kernels.pack_int4(torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 2).half())
    with pytest.raises(RuntimeError, match="packed int4"):
        torch.ops.gpt2chat.linear_i4_q8(torch.randn(2, 96), packed, scales, 8, None)
    with pytest.raises(RuntimeError, match="int16"):
        torch.ops.gpt2chat.linear_i4_q8(x, packed, scales.float(), 8, None)
    with pytest.raises(RuntimeError, match="packed 4x8|scale"):
        torch.ops.gpt2chat.linear_i8_q8(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 2), None)
