"""The fast training path on CPU: variable-length attention for packed rows, lean RMSNorm/SwiGLU,
selective activation checkpointing, and the policy that picks them. GPU kernels: tests/test_gpu_train.py."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.kernels import varlen_attention as va
from lmforge.model.patches import configure_for_training, enable_gradient_checkpointing, enable_varlen_attention


def _policy_args(**kw):
    base = dict(use_liger_kernel=False, lean_layers="auto", varlen_attention="auto", packing=True, attn_impl=None)
    base.update(kw)
    return SimpleNamespace(**base)


# ---------------------------------------------------------------- sequence boundaries

def test_segments_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    seg = va.segments_from_position_ids(pos, 1, 9)
    assert seg.bounds == [0, 3, 5, 9] and seg.max_len == 4 and seg.cu.dtype == torch.int32
    # unpacked rows (one sequence each, shared [1, T] positions): nothing to do
    assert va.segments_from_position_ids(torch.arange(5)[None], 3, 5) is None
    # packed rows in a [B, T] batch: every row start is a boundary too
    pos2 = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]])
    assert va.segments_from_position_ids(pos2, 2, 4).bounds == [0, 2, 4, 8]


def test_torch_varlen_kwargs_follow_the_installed_signature():
    def old(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, return_aux=None): ...

    def new(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
            enable_gqa=False): ...

    assert va._torch_varlen_kwargs(old, gqa=False, scale=0.125, head_dim=64) == {"is_causal": True}
    assert va._torch_varlen_kwargs(new, gqa=True, scale=0.2, head_dim=64) == {
        "window_size": (-1, 0), "scale": 0.2, "enable_gqa": True}
    with pytest.raises(RuntimeError, match="scale"):
        va._torch_varlen_kwargs(old, gqa=False, scale=0.2, head_dim=64)
    if hasattr(torch.nn.attention, "varlen"):   # the installed one parses too
        from torch.nn.attention.varlen import varlen_attn

        assert va._torch_varlen_kwargs(varlen_attn, gqa=True, scale=0.1, head_dim=64)
        assert "cu_seq_q" in inspect.signature(varlen_attn).parameters


def test_kernel_self_test_rejects_a_wrong_kernel(monkeypatch):
    assert va._self_test("sdpa_segments", torch.device("cpu"), torch.float32, 4, 2, 8) is None

    def leaky(q, k, v, seg, scale):   # attends across sequences: what a missing mask would do
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                             is_causal=True, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)

    monkeypatch.setitem(va.KERNELS, "leaky", leaky)
    assert "differs" in va._self_test("leaky", torch.device("cpu"), torch.float32, 4, 2, 8)
    with pytest.raises(ValueError, match="unknown varlen"):
        with va.use_backend("nope"):
            pass


# ---------------------------------------------------------------- packed loss and gradients

def _packed_and_padded(tok, n_rows=10, max_length=256):
    from lmforge.dataset import encode_dataset, load_dataset
    from lmforge.dataset.packing import pack_dataset
    from lmforge.template import get_template
    from lmforge.trainers.collator import Collator

    template = get_template(tok, max_length=max_length)
    template.set_mode("train")
    train, _ = load_dataset([f"builtin:self-cognition#{n_rows}", f"builtin:arith#{n_rows}"], model_name=["A"],
                            model_author=["B"])
    ds = encode_dataset(train, template, cache=False)
    rows = [ds[i] for i in range(len(ds))]
    packed_ds = pack_dataset(ds, max_length)
    packed = Collator(tok.pad_token_id, padding_free=True)([packed_ds[i] for i in range(len(packed_ds))])
    padded = Collator(tok.pad_token_id)(rows)
    return packed, padded


def _loss_and_grads(model, batch):
    from lmforge.registry import LOSSES

    batch = dict(batch)
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits
    loss = LOSSES.get("cross_entropy")(logits[:, :-1], labels[:, 1:])
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss.detach(), grads


def test_varlen_packed_loss_and_grads_equal_masked_and_unpacked(tiny_model_tokenizer):
    """Packed rows through lmforge_varlen = packed rows through sdpa's block mask = the padded batch."""
    model, tok = tiny_model_tokenizer
    model.train()
    packed, padded = _packed_and_padded(tok)
    loss_padded, g_padded = _loss_and_grads(model, padded)
    loss_masked, g_masked = _loss_and_grads(model, packed)
    assert "variable-length" in enable_varlen_attention(model, required=True)
    assert model.config._attn_implementation == va.ATTN_NAME
    calls = va.stats["varlen_calls"]
    loss_varlen, g_varlen = _loss_and_grads(model, packed)
    assert va.stats["varlen_calls"] > calls, "the varlen kernel was not used"
    assert abs(loss_varlen - loss_padded) / loss_padded < 1e-5, (loss_varlen, loss_padded)
    assert abs(loss_varlen - loss_masked) / loss_masked < 1e-6
    for a, b, c in zip(g_varlen, g_masked, g_padded):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
        assert torch.allclose(a, c, atol=1e-5, rtol=1e-3)


def test_collator_boundaries_skip_every_device_read_and_change_nothing(tiny_model_tokenizer, monkeypatch):
    """With the collator's boundaries the varlen path reads no GPU value on the host before a forward:
    neither transformers' packed-sequence check nor lmforge's own boundary search runs, and the loss and
    gradients equal the position-ids path's. A model on another attention keeps transformers' check."""
    from transformers import masking_utils

    from lmforge.trainers.collator import Collator

    model, tok = tiny_model_tokenizer
    model.train()
    packed, _ = _packed_and_padded(tok)
    assert "variable-length" in enable_varlen_attention(model, required=True)
    loss_pos, g_pos = _loss_and_grads(model, packed)

    rows = packed["position_ids"][0]
    bounded = Collator(tok.pad_token_id, padding_free=True, boundaries=True)(
        [{"input_ids": packed["input_ids"][0].tolist(), "labels": packed["labels"][0].tolist(),
          "position_ids": rows.tolist()}])
    starts = (rows == 0).nonzero().squeeze(1).tolist()
    assert bounded["cu_seq_lens_q"].tolist() == starts + [rows.numel()]
    assert bounded["max_length_q"] == max(b - a for a, b in zip(starts, starts[1:] + [rows.numel()]))

    def no_read(*a, **k):
        raise AssertionError("a host read of a GPU value before the forward")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", no_read)
    monkeypatch.setattr(va, "segments_from_position_ids", no_read)
    va._cache.update(key=None, ref=None, value=None)
    loss_cu, g_cu = _loss_and_grads(model, bounded)
    assert abs(loss_cu - loss_pos) / loss_pos < 1e-6
    for a, b in zip(g_cu, g_pos):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)

    model.set_attn_implementation("sdpa")  # the check stays for everyone else
    with pytest.raises(AssertionError, match="host read"):
        _loss_and_grads(model, packed)


def test_varlen_model_still_pads_and_generates_like_sdpa(tiny_model_tokenizer):
    model, tok = tiny_model_tokenizer
    model.eval()
    ids = torch.randint(5, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        gen_ref = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
        enable_varlen_attention(model, required=True)
        out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        gen = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, gen_ref)


def test_varlen_refuses_what_it_cannot_compute(tiny_model_tokenizer):
    model, _ = tiny_model_tokenizer
    model.config.attention_dropout = 0.1
    line = enable_varlen_attention(model)
    assert "varlen attention off" in line and "attention_dropout" in line
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="--varlen_attention true"):
        enable_varlen_attention(model, required=True)


def test_varlen_with_checkpointing_and_lora_trains_like_masked(tiny_model_tokenizer):
    """Checkpoint recompute reuses the cached boundaries; LoRA gradients equal the masked path's."""
    from lmforge.tuners import prepare_model

    model, tok = tiny_model_tokenizer
    args = SimpleNamespace(train_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules=["all-linear"], modules_to_save=[], trainable_parameters=[],
                           gradient_checkpointing=True)
    packed, _ = _packed_and_padded(tok, n_rows=6)
    enable_varlen_attention(model, required=True)
    model = prepare_model(model, args)
    assert "2 of 4 layers" in enable_gradient_checkpointing(model, every=2)
    model.train()
    loss_v, g_v = _loss_and_grads(model, packed)
    model.get_base_model().set_attn_implementation("sdpa")
    loss_m, g_m = _loss_and_grads(model, packed)
    assert abs(loss_v - loss_m) / loss_m < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g_v, g_m))


# ---------------------------------------------------------------- lean layers

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rmsnorm_and_swiglu_match_the_modules(tiny_model_tokenizer, dtype):
    import copy

    from lmforge.model.kernels.lean_layers import patch_lean_layers

    model, _ = tiny_model_tokenizer
    layer = model.model.layers[0].to(dtype)
    lean = copy.deepcopy(layer)
    assert patch_lean_layers(lean) == {"rms_norm": 2, "swiglu": 1}
    for name in ("input_layernorm", "mlp"):
        a, b = getattr(layer, name), getattr(lean, name)
        x = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        ya, yb = a(x), b(x2)
        assert torch.equal(ya, yb), name                                   # forward: bit for bit
        gy = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, [x, *a.parameters()], gy)
        gb = torch.autograd.grad(yb, [x2, *b.parameters()], gy)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        for u, v in zip(ga, gb):
            assert (u.float() - v.float()).abs().max() <= tol * (1 + u.float().abs().max()), name


def test_lean_layers_keep_fewer_activations(tiny_model_tokenizer):
    """Bytes saved for backward by one training forward: about a third fewer with the lean layers."""
    import copy

    from lmforge.model.kernels.lean_layers import patch_lean_layers

    model, tok = tiny_model_tokenizer
    lean = copy.deepcopy(model)
    patch_lean_layers(lean)
    ids = torch.randint(5, len(tok), (2, 64), generator=torch.Generator().manual_seed(0))

    def saved_bytes(m):
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        m.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m.model(input_ids=ids, use_cache=False).last_hidden_state.sum()
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        return sum(n for (ptr, _), n in seen.items() if ptr not in params)

    plain, slim = saved_bytes(model), saved_bytes(lean)
    assert slim < 0.8 * plain, (slim, plain)


def test_lean_layers_leave_other_norms_alone():
    from lmforge.model.kernels.lean_layers import patch_lean_layers

    class GemmaLikeRMSNorm(torch.nn.Module):   # (1 + weight), as Gemma does
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            xf = x.float()
            return ((1 + self.weight) * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    class GeluMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = self.down_proj = torch.nn.Linear(8, 8)
            self.act_fn = torch.nn.GELU()

    m = torch.nn.Sequential(GemmaLikeRMSNorm(), GeluMLP())
    assert patch_lean_layers(m) == {"rms_norm": 0, "swiglu": 0}


# ---------------------------------------------------------------- checkpointing and policy

def test_gradient_checkpointing_every_k_layers(tiny_model_tokenizer):
    from transformers.modeling_layers import GradientCheckpointingLayer

    model, tok = tiny_model_tokenizer
    model.train()
    ids = torch.randint(5, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    loss0, g0 = _loss_and_grads(model, batch)
    assert "2 of 4" in enable_gradient_checkpointing(model, every=2)
    flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert flags == [True, False, True, False]
    loss1, g1 = _loss_and_grads(model, batch)
    assert torch.equal(loss0, loss1) and all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g0, g1))
    assert "4 of 4" in enable_gradient_checkpointing(model, every=1)
    with pytest.raises(ValueError, match="--gradient_checkpointing_every"):
        enable_gradient_checkpointing(model, every=0)


def test_policy_auto_is_cuda_only_and_flags_force(tiny_model_tokenizer):
    model, _ = tiny_model_tokenizer
    assert configure_for_training(model, _policy_args(), on_gpu=False) == []
    assert model.config._attn_implementation == "sdpa"
    lines = configure_for_training(model, _policy_args(varlen_attention="true", lean_layers="true"), on_gpu=False)
    assert any("lean layers: 2" in x or "RMSNorm" in x for x in lines)
    assert any("variable-length" in x for x in lines) and model.config._attn_implementation == va.ATTN_NAME
    lines = configure_for_training(model, _policy_args(varlen_attention="true", packing=False), on_gpu=False)
    assert any("--packing" in x for x in lines)
    with pytest.raises(RuntimeError, match="--attn_impl"):
        configure_for_training(model, _policy_args(varlen_attention="true", attn_impl="flex_attention"), on_gpu=False)


def test_switch_flags_parse_and_reject():
    from lmforge.arguments import TrainArguments
    from lmforge.arguments.base import ArgumentError, from_dict
    from lmforge.arguments.train import switch

    assert [switch(v) for v in ("auto", "true", "false", True, None)] == [None, True, False, True, None]
    args = from_dict(TrainArguments, {"fused_ce": "false", "varlen_attention": "true", "gradient_checkpointing_every": "2"})
    assert args.fused_ce == "false" and args.gradient_checkpointing_every == 2
    with pytest.raises(ArgumentError, match="--fused_ce must be one of auto, true, false"):
        from_dict(TrainArguments, {"fused_ce": "maybe"})


def test_8bit_optimizer_without_bitsandbytes_names_the_flag():
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    from lmforge.arguments import TrainArguments
    from lmforge.pipelines.sft import _check_optimizer

    with pytest.raises(RuntimeError, match="--optim adamw_bnb_8bit needs bitsandbytes"):
        _check_optimizer(TrainArguments(optim="adamw_bnb_8bit"))
    _check_optimizer(TrainArguments(optim="adamw_torch"))


def test_sft_fast_path_end_to_end(tmp_path):
    """Packing + varlen attention + fused loss + lean layers + every-2nd-layer checkpointing, forced on CPU:
    the first logged loss equals the plain packed run's (same initial weights, same data) and training learns."""
    from lmforge import TrainArguments, sft_main

    def run(name: str, **fast):
        res = sft_main(TrainArguments(
            model="builtin:tiny", dataset=["builtin:arith#256"], output_dir=str(tmp_path / name), add_version=False,
            max_steps=12, logging_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1,
            learning_rate=2e-3, lr_scheduler_type="constant", warmup_ratio=0.0, report_to=["none"], plot=False,
            save_steps=100, packing=True, max_length=256, train_type="full", **fast))
        return [h["loss"] for h in res["log_history"] if "loss" in h]

    plain = run("plain")
    fast = run("fast", varlen_attention="true", fused_ce="true", lean_layers="true", gradient_checkpointing=True,
               gradient_checkpointing_every=2)
    assert abs(plain[0] - fast[0]) <= 1e-5 * plain[0], (plain[0], fast[0])
    assert max(abs(a - b) / a for a, b in zip(plain, fast)) < 1e-3, (plain, fast)
    assert fast[-1] < fast[0] * 0.8


def test_default_collator_passes_boundaries_only_where_they_can_be_used(tiny_model_tokenizer):
    from lmforge.pipelines.sft import default_collator

    model, tok = tiny_model_tokenizer
    setup = SimpleNamespace(tokenizer=tok, args=SimpleNamespace(packing=True), template=SimpleNamespace(vision=None))
    enable_varlen_attention(model, required=True)
    assert default_collator(setup, model).boundaries  # lmforge_varlen reads them
    setup.args.packing = False
    assert not default_collator(setup, model).boundaries  # padded batches have no sequences to bound
    setup.args.packing = True
    model.set_attn_implementation("sdpa")
    assert not default_collator(setup, model).boundaries  # transformers' sdpa would ignore them

    class Closed(torch.nn.Module):  # a forward without **kwargs would reject the extra keywords
        config = SimpleNamespace(_attn_implementation=va.ATTN_NAME)

        def forward(self, input_ids, position_ids=None, labels=None):
            return input_ids

    assert not default_collator(setup, Closed()).boundaries
