"""The lean LoRA forward against peft's own: same outputs and gradients, fewer saved bytes, peft's forward
wherever the call is not the plain single-adapter case."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from lmforge.tuners.lean_lora import patch_lean_lora


def _model(dtype=torch.float32, dropout=0.0, **lora_kw):
    torch.manual_seed(0)
    conf = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True)
    base = Qwen2ForCausalLM(conf).to(dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            **lora_kw))
    with torch.no_grad():   # B starts at zero; a random B makes the adapter path count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _lora_layers(model):
    from peft.tuners.lora.layer import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _unpatch(model):
    for m in _lora_layers(model):
        m.__dict__.pop("forward", None)
        m.__dict__.pop("_lmforge_lean_lora", None)


def _run(model, ids, autocast=False):
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=ids).logits
    (logits.float().square().mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


def test_float32_equals_peft_outputs_and_gradients():
    model = _model()
    ids = torch.randint(0, 300, (2, 17))
    ref_logits, ref_grads = _run(model, ids)
    assert patch_lean_lora(model) == 14   # 7 linear layers x 2 decoder layers
    logits, grads = _run(model, ids)
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert set(grads) == set(ref_grads) and any("lora_A" in n for n in grads)
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n], atol=1e-6, rtol=1e-4), n


def test_bf16_under_autocast_matches_peft_and_keeps_float32_adapter_gradients():
    model = _model(dtype=torch.bfloat16)   # peft keeps the adapters in float32 beside a bf16 base
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in _lora_layers(model))
    ids = torch.randint(0, 300, (2, 33))
    ref_logits, ref_grads = _run(model, ids, autocast=True)
    patch_lean_lora(model)
    logits, grads = _run(model, ids, autocast=True)
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() <= 0.02 * scale   # bf16 rounding, not a different function
    for n, g in grads.items():
        assert g.dtype == ref_grads[n].dtype
        cos = torch.nn.functional.cosine_similarity(g.flatten().float(), ref_grads[n].flatten().float(), dim=0)
        assert cos > 0.99, (n, cos)


def _saved_bytes(model, ids):
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device.type)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids).logits.float().sum()
    return sum(seen.values())


# peft under autocast keeps a bf16 copy of each adapted layer's input (7 per decoder layer); the lean path keeps the
# inputs themselves, one per distinct input (q/k/v share one, gate/up one): 3 fewer hidden-sized bf16 tensors. With
# dropout peft keeps a dropped float32 copy (the CPU kernel) of each input; lean keeps the inputs and 1-byte masks.
@pytest.mark.parametrize("dropout,fewer_bytes_per_element", [(0.0, 3 * 2), (0.1, 6 * 3)])
def test_the_lean_forward_keeps_no_copy_of_the_input_per_adapter(dropout, fewer_bytes_per_element):
    model = _model(dtype=torch.bfloat16, dropout=dropout)
    model.train()
    for p in model.parameters():
        p.requires_grad_(p.dtype == torch.float32)   # the adapters train, as in a LoRA run
    ids = torch.randint(0, 300, (4, 64))
    before = _saved_bytes(model, ids)
    patch_lean_lora(model)
    after = _saved_bytes(model, ids)
    layers, tokens, hidden = 2, ids.numel(), 64
    assert before - after >= layers * fewer_bytes_per_element * tokens * hidden, (before, after)


def test_dropout_draws_the_same_masks_as_peft():
    model = _model(dropout=0.3)
    model.train()
    ids = torch.randint(0, 300, (2, 9))
    torch.manual_seed(5)
    ref, ref_grads = _run(model, ids)
    patch_lean_lora(model)
    torch.manual_seed(5)
    out, grads = _run(model, ids)
    assert torch.allclose(out, ref, atol=1e-5)
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n], atol=1e-6, rtol=1e-4), n
    with torch.autocast("cpu", dtype=torch.bfloat16):   # a bf16 GEMM beside float32 input and adapter
        logits = model(input_ids=ids).logits
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_peft_forward_runs_whenever_the_call_is_not_the_plain_case(monkeypatch):
    from peft.tuners.lora.layer import Linear

    model = _model()
    ids = torch.randint(0, 300, (1, 8))
    patch_lean_lora(model)
    lean, _ = _run(model, ids)
    calls = []
    peft_forward = Linear.forward

    def counted(self, *a, **kw):
        calls.append(1)
        return peft_forward(self, *a, **kw)

    monkeypatch.setattr(Linear, "forward", counted)
    assert torch.allclose(_run(model, ids)[0], lean)
    assert not calls   # the plain case never calls peft's forward
    with model.disable_adapter():
        off = model(input_ids=ids).logits
    assert len(calls) == 14
    _unpatch(model)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(off, model(input_ids=ids).logits)
    patch_lean_lora(model)
    model.add_adapter("second", LoraConfig(r=2, target_modules="all-linear"))
    model.base_model.set_adapter(["default", "second"])   # two active adapters: peft sums them
    calls.clear()
    model(input_ids=ids)
    assert len(calls) == 14


def test_dora_keeps_peft_forward():
    model = _model(use_dora=True)
    ids = torch.randint(0, 300, (1, 8))
    ref, _ = _run(model, ids)
    patch_lean_lora(model)   # patched, but every DoRA call goes to peft
    out, _ = _run(model, ids)
    assert torch.equal(out, ref)


def test_lora_tuner_applies_it_unless_turned_off():
    from lmforge.tuners.prepare import _lora

    conf = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=100)
    args = SimpleNamespace(lora_rank=2, lora_alpha=4, lora_dropout=0.0, target_modules=None, modules_to_save=[],
                           trainable_parameters=[], gradient_checkpointing=False)
    on = _lora(Qwen2ForCausalLM(conf), args)
    off = _lora(Qwen2ForCausalLM(conf), SimpleNamespace(**vars(args), lean_lora=False))
    assert all(getattr(m, "_lmforge_lean_lora", False) for m in _lora_layers(on))
    assert not any(getattr(m, "_lmforge_lean_lora", False) for m in _lora_layers(off))


def test_deepcopy_keeps_the_forward_bound_to_the_copy():
    import copy

    model = _model()
    patch_lean_lora(model)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_B" in name:
                p.zero_()
        base = model.get_base_model()
        with model.disable_adapter():
            plain = base(input_ids=ids).logits
        assert torch.allclose(twin(input_ids=ids).logits, plain, atol=1e-6)
        assert not torch.allclose(model(input_ids=ids).logits, plain, atol=1e-4)


@pytest.mark.gpu
def test_on_cuda_bf16_it_matches_peft():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = _model(dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, 300, (2, 65), device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().square().mean().backward()
        return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    ref_logits, ref_grads = run()
    patch_lean_lora(model)
    logits, grads = run()
    assert (logits - ref_logits).abs().max() <= 0.02 * ref_logits.abs().max()
    for n, g in grads.items():
        assert torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[n].flatten(), dim=0) > 0.99, n
