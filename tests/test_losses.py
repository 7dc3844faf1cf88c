"""Objectives: the pure functions against independent formulas, bad input, and parity with TRL.

TRL parity: the same token ids are scored through TRL's own trainer code (DPOTrainer.compute_loss,
ORPOTrainer.get_batch_loss_metrics, SFTTrainer.compute_loss, each with its own collator) on transformers'
GPT2LMHeadModel, and through our losses on (a) that same HF model, isolating the objective, and (b) our
GPT loaded from the same checkpoint folder, end to end. Losses and parameter gradients agree to 1e-5.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.losses import dpo_loss, log1mexp, orpo_loss, sequence_logps, sft_loss

# transformers / TRL deprecation notices raised inside the peers' own code
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

VOCAB = 96
PAD_ID, EOS_ID = 2, 1


def _reference_token_logps(logits, labels, mask):
    """Independent definition: full log_softmax in float64, explicit shift."""
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    picked = logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask[:, 1:]).sum(-1), mask[:, 1:].sum(-1)


# ----------------------------------------------------------------------------------------------------
# sequence_logps / sft_loss


def test_sequence_logps_matches_log_softmax_and_ignores_unmasked_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.randint(0, 2, (3, 7), generator=g)
    mask[:, 0] = 1  # position 0 has no prediction: must not count even when set
    garbage_labels = torch.where(mask.bool(), labels, torch.full_like(labels, -100))
    garbage_labels[:, 0] = -100  # the first label is never read either

    sums, counts = sequence_logps(logits, garbage_labels, mask)
    ref_sums, ref_counts = _reference_token_logps(logits, labels, mask)
    torch.testing.assert_close(sums.double(), ref_sums, atol=1e-5, rtol=1e-6)
    assert counts.tolist() == ref_counts.tolist()
    assert sums.dtype == torch.float32


def test_sequence_logps_shift_direction():
    # logits at position t put all mass on token t + 1: every scored token has log-prob ~ 0
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    logits = torch.full((1, 5, 8), -30.0)
    logits[0, torch.arange(4), tokens[0, 1:]] = 30.0
    sums, counts = sequence_logps(logits, tokens, torch.ones_like(tokens))
    assert counts.item() == 4
    assert sums.item() > -1e-6
    # the unshifted reading (logits[t] scoring token t) would be hugely negative
    wrong, _ = sequence_logps(torch.cat([logits[:, :1], logits[:, :-1]], 1), tokens, torch.ones_like(tokens))
    assert wrong.item() < -100


def test_sequence_logps_bf16_logits_scored_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 6, 50, generator=g) * 4).bfloat16()
    labels = torch.randint(0, 50, (2, 6), generator=g)
    mask = torch.ones_like(labels)
    sums, _ = sequence_logps(logits, labels, mask)
    ref, _ = _reference_token_logps(logits.float(), labels, mask)
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums.double(), ref, atol=1e-4, rtol=1e-5)


def test_sequence_logps_bad_shapes():
    with pytest.raises(Gpt2ChatError, match="sequence_logps"):
        sequence_logps(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4))


def test_sft_loss_is_token_mean_cross_entropy_over_assistant_tokens():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 9, 13, generator=g, requires_grad=True)
    ids = torch.randint(0, 13, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    mask[0, 4:] = 1
    mask[1, 2:5] = 1
    mask[2, 8] = 1
    loss, metrics = sft_loss(logits, ids, mask)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert int(metrics["n_tokens"]) == int(mask[:, 1:].sum())
    assert not metrics["loss"].requires_grad
    # num_items rescales for gradient accumulation
    loss_acc, _ = sft_loss(logits, ids, mask, num_items=40)
    torch.testing.assert_close(loss_acc * 40, loss * int(mask[:, 1:].sum()))


def test_sft_loss_empty_mask_raises_instead_of_nan():
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.long)
    mask[:, 0] = 1  # only position 0, which is never predicted
    with pytest.raises(Gpt2ChatError, match="no token"):
        sft_loss(logits, ids, mask)
    with pytest.raises(Gpt2ChatError, match="num_items"):
        sft_loss(logits, ids, torch.ones_like(mask), num_items=0)
    # under gradient accumulation (num_items given) an empty micro-batch contributes 0, not an error
    logits.requires_grad_(True)
    loss, metrics = sft_loss(logits, ids, mask, num_items=10)
    loss.backward()
    assert loss.item() == 0.0 and int(metrics["n_tokens"]) == 0 and torch.all(logits.grad == 0)


# ----------------------------------------------------------------------------------------------------
# dpo_loss / orpo_loss as formulas


def test_dpo_loss_formula_and_metrics():
    pc = torch.tensor([-10.0, -20.0, -5.0], requires_grad=True)
    pr = torch.tensor([-12.0, -18.0, -9.0], requires_grad=True)
    rc = torch.tensor([-11.0, -19.0, -5.5])
    rr = torch.tensor([-11.5, -19.0, -8.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    margins = (0.5 * ((pc - rc) - (pr - rr))).detach()
    expected = sum(math.log1p(math.exp(-x)) for x in margins.tolist()) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (1 - 1 + 0.5) / 3)
    assert m["rewards/accuracies"].item() == pytest.approx(2 / 3)
    assert m["rewards/margins"].item() == pytest.approx(float(margins.mean()), rel=1e-6)
    loss.backward()
    assert pc.grad is not None and torch.all(pc.grad < 0)  # raising chosen log-probs lowers the loss


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_beta_must_be_positive(beta):
    x = torch.tensor([-1.0])
    with pytest.raises(Gpt2ChatError, match="beta"):
        dpo_loss(x, x, x, x, beta=beta)
    with pytest.raises(Gpt2ChatError, match="beta"):
        orpo_loss(torch.tensor(1.0), x, x, beta=beta)


def test_preference_losses_reject_mismatched_shapes():
    with pytest.raises(Gpt2ChatError, match="same shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(Gpt2ChatError, match="same shape"):
        orpo_loss(torch.tensor(1.0), torch.zeros(2), torch.zeros(3))


def test_log1mexp_accurate_at_both_ends():
    x = torch.tensor([-1e-7, -1e-3, -0.5, -0.7, -2.0, -40.0])
    expected = [math.log(-math.expm1(float(v))) for v in x.double()]
    torch.testing.assert_close(log1mexp(x).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-12)


def test_orpo_loss_formula_and_finite_at_probability_one():
    c = torch.tensor([-0.3, -1.2], requires_grad=True)
    r = torch.tensor([-0.9, -1.0], requires_grad=True)
    nll = torch.tensor(2.5, requires_grad=True)
    loss, m = orpo_loss(nll, c, r, beta=0.2)
    odds = lambda lp: math.exp(lp) / (1 - math.exp(lp))  # noqa: E731
    ratios = [math.log(odds(a) / odds(b)) for a, b in zip(c.tolist(), r.tolist(), strict=True)]
    log_sig = [-math.log1p(math.exp(-x)) for x in ratios]
    assert loss.item() == pytest.approx(2.5 - 0.2 * sum(log_sig) / 2, rel=1e-6)
    assert m["log_odds_chosen"].item() == pytest.approx(sum(ratios) / 2, rel=1e-5)
    assert m["log_odds_ratio"].item() == pytest.approx(sum(log_sig) / 2, rel=1e-5)
    assert m["nll_loss"].item() == pytest.approx(2.5)
    # per-example NLL is averaged
    loss_vec, _ = orpo_loss(torch.tensor([2.0, 3.0]), c, r, beta=0.2)
    assert loss_vec.item() == pytest.approx(loss.item(), rel=1e-6)
    # average log-prob exactly 0 (p == 1): finite loss and gradients
    c0 = torch.tensor([0.0, -1.0], requires_grad=True)
    loss0, _ = orpo_loss(torch.tensor(1.0), c0, torch.tensor([-2.0, -0.5]))
    loss0.backward()
    assert torch.isfinite(loss0) and torch.isfinite(c0.grad).all()


# ----------------------------------------------------------------------------------------------------
# Parity with TRL


def _word_tokenizer():
    """A word-level tokenizer over VOCAB ids ("w3" .. ): TRL's trainers want one; batches are pretokenized."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab.update({"<unk>": 0, "</s>": EOS_ID, "<pad>": PAD_ID})
    del vocab["w0"], vocab["w1"], vocab["w2"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", bos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _tiny_gpt2(seed: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # untie the init scale a bit so log-probs differ between models
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class _Policy:
    """One set of weights seen two ways: ``hf`` (transformers, driven by TRL) and ``ours`` (our side).

    ``kind == "transformers"``: our losses run on the same HF model (isolates the objective).
    ``kind == "gpt2chat"``: our GPT loaded from the same checkpoint folder as the HF model (end to end);
    its gradients are reported in HF's layout (Conv1D weights transposed) so they compare name by name.
    """

    def __init__(self, kind: str, folder=None, seed: int = 0):
        self.kind = kind
        if kind == "transformers":
            self.hf = _tiny_gpt2(seed)
            self.ours = self.hf
            return
        transformers = pytest.importorskip("transformers")
        from gpt2chat.checkpoint import load_model

        self.hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.ours = load_model(folder, device="cpu")[0].eval()
        if seed:  # a different model from the same folder: the same noise on both copies
            g = torch.Generator().manual_seed(seed)
            ours_params = dict(self.ours.named_parameters())
            with torch.no_grad():
                for name, p in self.hf.named_parameters():
                    noise = torch.randn(p.shape, generator=g) * 0.05
                    p.add_(noise)
                    ours_params[name].add_(noise.t() if name.endswith(_CONV1D) else noise)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(ids).logits if self.kind == "transformers" else self.ours(ids)

    def our_grads(self) -> dict[str, torch.Tensor]:
        grads = _grads(self.ours)
        if self.kind == "gpt2chat":
            grads = {n: g.t() if n.endswith(_CONV1D) else g for n, g in grads.items()}
        return grads


@pytest.fixture(params=["transformers", "gpt2chat"])
def policy_kind(request):
    if request.param == "gpt2chat":
        return request.param, request.getfixturevalue("tiny_checkpoint")
    return request.param, None


def _pairs(seed: int = 3):
    """Pretokenized preference pairs of different lengths (prompt_ids, chosen_ids, rejected_ids)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [
        {"prompt_ids": rand(5), "chosen_ids": rand(4) + [EOS_ID], "rejected_ids": rand(2) + [EOS_ID]},
        {"prompt_ids": rand(3), "chosen_ids": rand(1) + [EOS_ID], "rejected_ids": rand(6) + [EOS_ID]},
        {"prompt_ids": rand(8), "chosen_ids": rand(3) + [EOS_ID], "rejected_ids": rand(3) + [EOS_ID]},
    ]


def _text_rows(pairs):
    words = lambda ids: " ".join("</s>" if i == EOS_ID else f"w{i}" for i in ids)  # noqa: E731
    return [
        {"prompt": words(p["prompt_ids"]), "chosen": " " + words(p["chosen_ids"]),
         "rejected": " " + words(p["rejected_ids"])}
        for p in pairs
    ]


def _padded(rows, key_ids, key_mask):
    """Right-padded ids [B, T] and a mask aligned with them."""
    length = max(len(r[key_ids]) for r in rows)
    ids = torch.full((len(rows), length), PAD_ID)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r[key_ids])] = torch.tensor(r[key_ids])
        mask[b, : len(r[key_mask])] = torch.tensor(r[key_mask])
    return ids, mask


def _grads(model):
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(ours, theirs):
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _trl_args(config_cls, tmp_path, **kw):
    return config_cls(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", bf16=False,
        per_device_train_batch_size=3, **kw,
    )


def _our_pair_batch(pairs):
    """Chosen rows then rejected rows, prompt+reply ids, reply mask aligned with the ids."""
    rows = [{"ids": p["prompt_ids"] + p[k], "mask": [0] * len(p["prompt_ids"]) + [1] * len(p[k])}
            for k in ("chosen_ids", "rejected_ids") for p in pairs]
    return _padded(rows, "ids", "mask")


def test_dpo_matches_trl_loss_and_gradients(tmp_path, policy_kind):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    kind, folder = policy_kind
    policy_pair, reference_pair = _Policy(kind, folder, seed=0), _Policy(kind, folder, seed=1)
    policy, reference = policy_pair.hf, reference_pair.hf
    pairs = _pairs()
    trainer = trl.DPOTrainer(
        model=policy, ref_model=reference, args=_trl_args(trl.DPOConfig, tmp_path, beta=0.1),
        train_dataset=datasets.Dataset.from_list(_text_rows(pairs)), processing_class=_word_tokenizer(),
    )
    batch = trainer.data_collator([dict(p) for p in pairs])
    trl_loss = trainer.compute_loss(policy, batch)
    trl_loss.backward()
    trl_grads = _grads(policy)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    ids, reply_mask = _our_pair_batch(pairs)
    policy_logps, _ = sequence_logps(policy_pair.logits(ids), ids, reply_mask)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(reference_pair.logits(ids), ids, reply_mask)
    n = len(pairs)
    loss, metrics = dpo_loss(policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:], beta=0.1)
    loss.backward()

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    _assert_same_grads(policy_pair.our_grads(), trl_grads)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-4), key


def test_orpo_matches_trl_loss_and_gradients(tmp_path, policy_kind):
    datasets = pytest.importorskip("datasets")
    orpo = pytest.importorskip("trl.experimental.orpo")
    policy_pair = _Policy(*policy_kind)
    policy = policy_pair.hf
    pairs = _pairs(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = orpo.ORPOTrainer(
            model=policy, args=_trl_args(orpo.ORPOConfig, tmp_path, beta=0.1, max_length=64),
            train_dataset=datasets.Dataset.from_list(_text_rows(pairs)), processing_class=_word_tokenizer(),
        )
    features = []
    for p in pairs:
        row = {}
        for side in ("chosen", "rejected"):
            ids = p["prompt_ids"] + p[f"{side}_ids"]
            row[f"{side}_input_ids"] = ids
            row[f"{side}_attention_mask"] = [1] * len(ids)
            row[f"{side}_labels"] = [-100] * len(p["prompt_ids"]) + p[f"{side}_ids"]
        features.append(row)
    batch = trainer.data_collator(features)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(policy, batch)
    trl_loss.backward()
    trl_grads = _grads(policy)

    ids, reply_mask = _our_pair_batch(pairs)
    n = len(pairs)
    logits = policy_pair.logits(ids)
    sums, counts = sequence_logps(logits, ids, reply_mask)
    avg_logps = sums / counts
    # TRL's ORPO scores the NLL over prompt + chosen reply (every real token of the chosen rows)
    chosen_nll, _ = sft_loss(logits[:n], ids[:n], (ids[:n] != PAD_ID).long())
    loss, metrics = orpo_loss(chosen_nll, avg_logps[:n], avg_logps[n:], beta=0.1)
    loss.backward()

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    _assert_same_grads(policy_pair.our_grads(), trl_grads)
    for key in ("log_odds_ratio", "log_odds_chosen", "nll_loss", "rewards/chosen", "rewards/rejected",
                "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-5), key


@pytest.mark.parametrize(
    "kind, mask_column",
    [("transformers", "assistant_masks"), ("transformers", "completion_mask"), ("gpt2chat", "assistant_masks")],
)
def test_sft_matches_trl_assistant_only_loss(tmp_path, request, kind, mask_column):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    folder = request.getfixturevalue("tiny_checkpoint") if kind == "gpt2chat" else None
    policy_pair = _Policy(kind, folder)
    policy = policy_pair.hf
    g = torch.Generator().manual_seed(7)
    rows = []
    for prompt_len, reply_len in ((6, 4), (3, 9), (10, 2)):
        ids = torch.randint(3, VOCAB, (prompt_len + reply_len,), generator=g).tolist()
        rows.append({"input_ids": ids, mask_column: [0] * prompt_len + [1] * reply_len})
    trainer = trl.SFTTrainer(
        model=policy,
        args=_trl_args(trl.SFTConfig, tmp_path, completion_only_loss=mask_column == "completion_mask",
                       max_length=64),
        train_dataset=datasets.Dataset.from_list(rows), processing_class=_word_tokenizer(),
    )
    # TRL folds the mask into its labels column during dataset preparation
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trl_loss = trainer.compute_loss(policy, batch)
    trl_loss.backward()
    trl_grads = _grads(policy)

    ids, mask = _padded(rows, "input_ids", mask_column)
    loss, metrics = sft_loss(policy_pair.logits(ids), ids, mask)
    loss.backward()

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert int(metrics["n_tokens"]) == int((batch["labels"][:, 1:] != -100).sum())
    _assert_same_grads(policy_pair.our_grads(), trl_grads)
