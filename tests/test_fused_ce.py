"""Fused linear + cross-entropy: equal to the plain loss and its gradients, never the full logits,
and the Trainer's fused path (plain model, LoRA, LoRA with lm_head in modules_to_save) equals its plain path."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import torch.nn.functional as F

from lmforge.registry import LOSSES
from lmforge.trainers import fused_ce as fc
from lmforge.trainers.fused_ce import fused_linear_cross_entropy, linear_cross_entropy_sum


def _data(seed=0, N=37, H=16, V=50, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 3, 9, N - 1]] = -100
    scale = torch.rand(N, generator=g) + 0.5
    return hidden, weight, labels, scale


@pytest.fixture(params=["inplace", "pointwise"])
def chunk_kernel(request, monkeypatch):
    """Both forms of the per-chunk math (the pointwise one is what runs compiled on CUDA)."""
    fn = fc._ce_chunk_inplace if request.param == "inplace" else fc._ce_chunk_pointwise
    monkeypatch.setattr(fc, "_ce_chunk", fn)
    return request.param


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_equals_cross_entropy_with_scale_ignore_and_smoothing(chunk_kernel, smoothing, chunk_size):
    hidden, weight, labels, scale = _data()
    s, n = linear_cross_entropy_sum(hidden, weight, labels, loss_scale=scale, label_smoothing=smoothing,
                                    chunk_size=chunk_size)
    gh, gw = torch.autograd.grad(s / n, (hidden, weight))
    per_tok = F.cross_entropy(hidden @ weight.T, labels, reduction="none", label_smoothing=smoothing)
    ref = (per_tok * scale).sum()
    rh, rw = torch.autograd.grad(ref / n, (hidden, weight))
    assert int(n) == 33
    assert torch.allclose(s, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gh, rh, atol=1e-6) and torch.allclose(gw, rw, atol=1e-6)


def test_normalisation_matches_the_registered_loss(chunk_kernel):
    """Same value and gradients as LOSSES['cross_entropy'] over full logits, with num_items_in_batch."""
    hidden, weight, labels, scale = _data(1)
    for n_items in (None, 50, torch.tensor(50)):
        loss = fused_linear_cross_entropy(hidden, weight, labels, loss_scale=scale, num_items_in_batch=n_items)
        ref = LOSSES.get("cross_entropy")((hidden @ weight.T)[None], labels[None], loss_scale=scale[None],
                                          num_items_in_batch=n_items)
        assert torch.allclose(loss, ref, atol=1e-6), (n_items, loss, ref)
        g = torch.autograd.grad(loss, (hidden, weight))
        r = torch.autograd.grad(ref, (hidden, weight))
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, r))


def test_frozen_weight_or_hidden_forms_only_the_needed_gradient():
    hidden, weight, labels, _ = _data(2)
    s, _ = linear_cross_entropy_sum(hidden, weight.detach(), labels, chunk_size=5)     # LoRA: frozen lm_head
    (gh,) = torch.autograd.grad(s, hidden)
    (rh,) = torch.autograd.grad(F.cross_entropy(hidden @ weight.detach().T, labels, reduction="sum"), hidden)
    assert torch.allclose(gh, rh, atol=1e-5)
    s, _ = linear_cross_entropy_sum(hidden.detach(), weight, labels, chunk_size=5)
    (gw,) = torch.autograd.grad(s, weight)
    (rw,) = torch.autograd.grad(F.cross_entropy(hidden.detach() @ weight.T, labels, reduction="sum"), weight)
    assert torch.allclose(gw, rw, atol=1e-5)
    with torch.no_grad():                                                               # eval: no gradients formed
        s, _ = linear_cross_entropy_sum(hidden, weight, labels)
    assert not s.requires_grad


def test_no_labelled_token_gives_zero_and_a_graph():
    hidden, weight, labels, _ = _data(3)
    labels[:] = -100
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad.abs().sum() == 0 and not torch.isnan(weight.grad).any()


def test_bf16_close_to_float32_reference():
    hidden, weight, labels, scale = _data(4, N=64, H=32, V=300)
    hb, wb = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    s, n = linear_cross_entropy_sum(hb, wb, labels, loss_scale=scale, chunk_size=16)
    gh, gw = torch.autograd.grad(s / n, (hb, wb))
    assert s.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    hf, wf = hb.detach().float().requires_grad_(), wb.detach().float().requires_grad_()
    ref = (F.cross_entropy(hf @ wf.T, labels, reduction="none") * scale).sum()
    rh, rw = torch.autograd.grad(ref / n, (hf, wf))
    assert abs(s.item() - ref.item()) / ref.item() < 1e-2
    assert (gh.float() - rh).abs().max() < 2e-2 * rh.abs().max()
    assert (gw.float() - rw).abs().max() < 2e-2 * rw.abs().max()


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op makes while active."""

    numel = 0

    def __enter__(self):
        LargestTensor.numel = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                LargestTensor.numel = max(LargestTensor.numel, t.numel())
        return out


def test_never_builds_full_logits():
    """No tensor made in the forward or backward pass is as large as the [N, V] logits."""
    N, H, V, chunk = 64, 8, 40, 16
    hidden, weight, labels, scale = _data(5, N=N, H=H, V=V)
    with LargestTensor():
        loss = fused_linear_cross_entropy(hidden, weight, labels, loss_scale=scale, chunk_size=chunk)
        loss.backward()
    assert 0 < LargestTensor.numel <= chunk * V < N * V


def test_default_chunk_rows():
    assert fc.default_chunk_rows(151936) == 1728          # ~2^28 logits per chunk for Qwen's vocabulary
    assert fc.default_chunk_rows(100) == 8192 and fc.default_chunk_rows(10**9) == 64
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy_sum(*_data()[:3], chunk_size=0)


# ---------------------------------------------------------------- the Trainer's fused path

def _batch(tok_vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, tok_vocab, (2, 20), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 15:] = -100
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    scale = torch.rand(2, 20, generator=g) + 0.5
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "loss_scale": scale}


def _plain_and_fused(model, batch, n_items=None):
    from lmforge.trainers.output_head import resolve_output_head
    from lmforge.trainers.trainer import FusedLoss

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_scale")}
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(**inputs, use_cache=False).logits
    plain = LOSSES.get("cross_entropy")(logits[:, :-1], batch["labels"][:, 1:], loss_scale=batch["loss_scale"][:, 1:],
                                        num_items_in_batch=n_items)
    g_plain = torch.autograd.grad(plain, params)
    head, why = resolve_output_head(model)
    assert head is not None, why
    with head.returning_hidden_states():
        hidden = model(**inputs, use_cache=False).logits
    fused = FusedLoss(head, 0.0, False)(hidden, batch["labels"], batch["loss_scale"], n_items)
    g_fused = torch.autograd.grad(fused, params)
    return plain, fused, list(zip(params, g_plain, g_fused))


@pytest.mark.parametrize("tuner", ["full", "lora", "lora+lm_head"])
def test_trainer_fused_loss_equals_plain(tiny_model_tokenizer, tuner):
    from types import SimpleNamespace

    from lmforge.tuners import prepare_model

    model, tok = tiny_model_tokenizer
    if tuner != "full":
        args = SimpleNamespace(train_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                               target_modules=["all-linear"], modules_to_save=["lm_head"] if "lm_head" in tuner else [],
                               trainable_parameters=[], gradient_checkpointing=False)
        model = prepare_model(model, args)
    model.train()
    plain, fused, grads = _plain_and_fused(model, _batch(len(tok)), n_items=40)
    assert torch.allclose(plain, fused, rtol=1e-5), (plain, fused)
    assert grads
    for p, a, b in grads:
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), (p.shape, (a - b).abs().max())
    if tuner == "lora+lm_head":   # the trained copy of lm_head gets the gradient
        assert any(p.shape[0] == len(tok) or p.shape[0] >= 900 for p, _, _ in grads)


def test_output_head_refusals(tiny_model_tokenizer):
    from types import SimpleNamespace

    from lmforge.trainers.output_head import check_output_head, resolve_output_head
    from lmforge.tuners import prepare_model

    model, tok = tiny_model_tokenizer
    head, why = resolve_output_head(model)
    assert head is not None and why == "" and check_output_head(model, head) == ""
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in resolve_output_head(model)[1]
    model.config.final_logit_softcapping = None
    args = SimpleNamespace(train_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules=["q_proj", "lm_head"], modules_to_save=[], trainable_parameters=[],
                           gradient_checkpointing=False)
    lora_head = prepare_model(model, args)
    head, why = resolve_output_head(lora_head)
    assert head is None and "LoRA" in why


def test_output_head_check_catches_a_changed_head(tiny_model_tokenizer):
    """A model that transforms its logits non-linearly after lm_head (with no config field saying so) is caught
    by the probe. (A linear scaling is harmless: with lm_head bypassed it scales the hidden states instead.)"""
    from lmforge.trainers.output_head import check_output_head, resolve_output_head

    model, _ = tiny_model_tokenizer
    head, _ = resolve_output_head(model)
    orig = type(model).forward

    class Scaled(type(model)):
        def forward(self, *a, **k):
            out = orig(self, *a, **k)
            out.logits = torch.tanh(out.logits)
            return out

    model.__class__ = Scaled
    assert "differs" in check_output_head(model, head)


def test_liger_kernel_is_not_used_on_cpu(tmp_path):
    from types import SimpleNamespace

    from lmforge.model.patches import configure_for_training

    args = SimpleNamespace(use_liger_kernel=True, lean_layers="auto", varlen_attention="auto", packing=False,
                           attn_impl=None)
    with pytest.raises(RuntimeError, match="--use_liger_kernel needs a CUDA GPU"):
        configure_for_training(None, args, on_gpu=False)


def test_liger_loss_is_importable_when_installed():
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")
    assert callable(fn)


def test_sft_fused_ce_true_trains_like_the_plain_loss(tmp_path):
    """End to end on CPU: --fused_ce true gives the plain run's losses step for step."""
    from lmforge import TrainArguments, sft_main

    def run(fused: str):
        res = sft_main(TrainArguments(
            model="builtin:tiny", dataset=["builtin:arith#64"], output_dir=str(tmp_path / fused), add_version=False,
            max_steps=4, logging_steps=1, per_device_train_batch_size=8, gradient_accumulation_steps=2,
            learning_rate=2e-3, lr_scheduler_type="constant", warmup_ratio=0.0, report_to=["none"], plot=False,
            save_steps=100, fused_ce=fused, train_type="full"))
        return [h["loss"] for h in res["log_history"] if "loss" in h], res["trainer"]

    plain, _ = run("false")
    fused, trainer = run("true")
    assert trainer._fused_ce, "the fused path was not taken"
    assert len(plain) == len(fused) == 4
    for a, b in zip(plain, fused):
        assert abs(a - b) <= 1e-4 * abs(a), (plain, fused)
