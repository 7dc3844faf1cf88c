"""FlexAttention plans (packed and shared-prompt rows): the tile lists against the dense mask, and the same
logits, losses and gradients as the dense-mask path, on CPU (eager FlexAttention); the CUDA-only choices
(padded LM head, kernel selection) where CPU can check them."""

from __future__ import annotations

import pytest
import torch

from gpt2chat.attention_plan import AttentionPlan
from gpt2chat.block_masks import row_masks
from gpt2chat.config import get_preset
from gpt2chat.model import GPT, attention_kernel

BLOCK = 16


def packed_layout(lengths_per_row: list[list[int]], width: int):
    """segment ids (pads: segment 0 at the end) and restarting positions of packed rows."""
    segments = torch.zeros(len(lengths_per_row), width, dtype=torch.long)
    positions = torch.zeros_like(segments)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for number, length in enumerate(lengths, start=1):
            segments[row, start : start + length] = number
            positions[row, start : start + length] = torch.arange(length)
            start += length
        positions[row, start:] = torch.arange(width - start)
    return segments, positions


def shared_layout(parts_per_row: list[tuple[int, int, int]], width: int):
    """branch, position and segment ids of `prompt, chosen, rejected` rows padded to `width`."""
    n = len(parts_per_row)
    branches = torch.zeros(n, width, dtype=torch.long)
    positions = torch.zeros_like(branches)
    segments = torch.ones_like(branches)
    for row, (p, c, r) in enumerate(parts_per_row):
        total = p + c + r
        branches[row, p : p + c] = 1
        branches[row, p + c : total] = 2
        positions[row, :total] = torch.tensor([*range(p + c), *range(p, p + r)])
        positions[row, total:] = torch.arange(width - total)
        segments[row, total:] = 0
    return branches, positions, segments


def listed(block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles computed with the mask, tiles computed without it) of a BlockMask, as [B, n, n] booleans."""
    def dense(count, index):
        n = index.shape[-1]
        out = torch.zeros(*index.shape[:-1], n, dtype=torch.bool)
        for b in range(index.shape[0]):
            for i in range(index.shape[2]):
                out[b, 0, i, index[b, 0, i, : count[b, 0, i]].long()] = True
        return out[:, 0]

    return (dense(block_mask.kv_num_blocks, block_mask.kv_indices),
            dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices))


def truth(mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of the dense [B, 1, T, T] mask: some pair allowed, every pair allowed (tail = not allowed)."""
    b, t = mask.shape[0], mask.shape[-1]
    padded = torch.zeros(b, n * BLOCK, n * BLOCK, dtype=torch.bool)
    padded[:, :t, :t] = mask[:, 0]
    tiles = padded.view(b, n, BLOCK, n, BLOCK)
    return tiles.any(dim=(2, 4)), tiles.all(dim=(2, 4))


LAYOUTS = {
    "packed": lambda: packed_layout([[40, 17, 33], [100], [5, 5, 60, 3]], 100),
    "packed-aligned": lambda: packed_layout([[32, 16, 48], [96]], 96),
    "shared": lambda: shared_layout([(30, 25, 40), (8, 50, 20), (0, 10, 10)], 100),
}


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tiles_hold_every_allowed_pair_and_full_tiles_only_allowed_ones(layout, window):
    config = get_preset("tiny-neo" if window else "tiny")
    if window:
        config = config.replace(window_size=window)
    ids = LAYOUTS[layout]()
    if layout == "shared":
        branches, positions, segments = ids
        dense = AttentionPlan.shared_prefix(config, branches, positions, segments, kernel="dense")
    else:
        segments, positions = ids
        branches = None
        dense = AttentionPlan.packed(config, segments, positions, kernel="dense")
    global_mask, local_mask = row_masks(segments, branches, positions, config.local_window, block_size=BLOCK)
    assert (local_mask is None) == (window is None)
    checks = [(global_mask, dense.global_layers.mask)]
    if window:
        checks.append((local_mask, dense.local_layers.mask))
    n = -(-segments.shape[1] // BLOCK)
    for block_mask, mask in checks:
        partial, full = listed(block_mask)
        some, every = truth(mask, n)
        assert not (partial & full).any()
        assert ((partial | full) >= some).all(), "a tile with allowed pairs is skipped"
        assert (every >= full).all(), "a tile computed without the mask holds pairs that may not attend"
        if layout.startswith("packed") and window is None:
            assert torch.equal(partial | full, some)   # exact: no tile computed in vain
            assert full.any()                          # and the long segments' inner tiles skip the mask


@pytest.fixture
def eager_flex_with_grad(monkeypatch):
    """Eager FlexAttention refuses gradients on CPU only by a device check: lift it, so CPU can compare the
    gradients of the reference implementation (its mask_mod semantics) with the dense path's."""
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)


@pytest.mark.parametrize(("preset", "layout"), [
    ("tiny-neo", "packed"),
    ("tiny", "shared"),
    pytest.param("tiny", "packed", marks=pytest.mark.slow),
    pytest.param("tiny-neo", "shared", marks=pytest.mark.slow),
])  # fmt: skip
def test_flex_plan_gives_the_logits_and_gradients_of_the_dense_plan(preset, layout, eager_flex_with_grad):
    torch.manual_seed(0)
    config = get_preset(preset)
    if config.local_window:
        config = config.replace(window_size=24)   # shorter than the segments: the window matters
    model = GPT(config).train()                   # tiny presets: no dropout, so train mode is deterministic
    ids = LAYOUTS[layout]()
    input_ids = torch.randint(0, config.vocab_size, ids[0].shape)

    def run(kernel: str):
        model.zero_grad(set_to_none=True)
        if layout == "shared":
            branches, positions, segments = ids
            plan = AttentionPlan.shared_prefix(config, branches, positions, segments, kernel=kernel)
        else:
            segments, positions = ids
            plan = AttentionPlan.packed(config, segments, positions, kernel=kernel)
        logits = model(input_ids, plan)
        (logits.float().square().mean()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    dense_logits, dense_grads = run("dense")
    flex_logits, flex_grads = run("flex")
    assert flex_logits.shape == dense_logits.shape
    torch.testing.assert_close(flex_logits, dense_logits, atol=1e-5, rtol=1e-4)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_attention_kernel_picks_flex_on_cuda_unless_attention_dropout_trains():
    model = GPT(get_preset("tiny").replace(attn_pdrop=0.1))
    assert attention_kernel(model, "cpu") == "dense"
    model.eval()
    assert attention_kernel(model, "cuda") == "flex"
    model.train()
    with pytest.warns(UserWarning, match="dropout"):
        assert attention_kernel(model, "cuda") == "dense"
    for module in model.modules():
        if hasattr(module, "dropout_p"):
            module.dropout_p = 0.0
    assert attention_kernel(model, "cuda") == "flex"


def test_a_flex_plan_refuses_to_train_with_attention_dropout():
    model = GPT(get_preset("tiny").replace(attn_pdrop=0.1)).train()
    segments, positions = packed_layout([[10, 6]], 16)
    plan = AttentionPlan.packed(model.config, segments, positions, kernel="flex")
    with pytest.raises(ValueError, match="dropout"):
        model(torch.zeros(1, 16, dtype=torch.long), plan)


def test_padded_head_gives_the_same_logits_gradients_and_checkpoint(tmp_path, tiny_checkpoint):
    from gpt2chat.checkpoint import load_model, save_pretrained

    torch.manual_seed(0)
    model, tokenizer = load_model(tiny_checkpoint, device="cpu")
    config = model.config
    assert config.vocab_size % 64        # GPT-2's vocabulary plus the template's tokens
    input_ids = torch.randint(0, config.vocab_size, (2, 12))
    select = torch.tensor([0, 5, 13, 23])

    def run(multiple):
        model.vocab_multiple = multiple
        model.zero_grad(set_to_none=True)
        logits = model(input_ids, select=select)
        logits.float().logsumexp(-1).sum().backward()
        return logits.detach(), model.transformer.wte.weight.grad.clone()

    plain_logits, plain_grad = run(0)
    padded_logits, padded_grad = run(64)
    assert padded_logits.shape == (4, config.vocab_size)
    torch.testing.assert_close(padded_logits, plain_logits)
    torch.testing.assert_close(padded_grad, plain_grad)
    assert model.transformer.wte.weight.shape[0] == config.vocab_size
    save_pretrained(model, tokenizer, tmp_path / "saved")
    loaded, _ = load_model(tmp_path / "saved", device="cpu")
    assert loaded.config.vocab_size == config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids), model(input_ids))


def test_compiled_blocks_keep_their_names_and_the_fsdp_skeleton_stays_plain():
    from gpt2chat.train.distributed import meta_copy

    model = GPT(get_preset("tiny"))
    names = list(model.state_dict())
    model.compile_blocks()                    # lazy: nothing compiles before a forward
    assert list(model.state_dict()) == names  # unlike torch.compile(model), no _orig_mod. prefix to save
    assert all(block._compiled_call_impl is not None for block in model.transformer.h)
    skeleton = meta_copy(model)               # FSDP rebuilds the saved model from this; it must not call the
    assert all(m._compiled_call_impl is None for m in skeleton.modules())   # original blocks' compiled code
