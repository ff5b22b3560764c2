"""GPU checks of the fast training path (``-m gpu``; run by benchmarks/gpu_check_train.sh, ~1-2 min on an H100).

What CPU tests cannot show: the CUDA varlen kernels against masked SDPA in bf16, the compiled
fused cross-entropy and lean layers against the plain ops, the memory the fused loss saves,
Liger's path and the 8-bit optimizer running. Every check prints what it measured.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _small_qwen(vocab: int = 151936, layers: int = 2):
    """A random bf16 Qwen2 with the 0.5B's head shapes and vocabulary, built on the GPU."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model


def _packed_batch(vocab: int, lengths=(700, 300, 1200, 64, 1784), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    labels[0, starts] = -100
    return {"input_ids": ids.cuda(), "position_ids": pos.cuda(), "labels": labels.cuda()}


@pytest.mark.parametrize("heads", [(14, 2, 64), (28, 4, 128)], ids=["qwen0.5b", "qwen7b"])
def test_varlen_kernels_pass_their_self_test(heads):
    from lmforge.model.kernels import varlen_attention as va

    ok = []
    for name in va.CUDA_BACKENDS:
        why = va._self_test(name, torch.device("cuda"), torch.bfloat16, *heads)
        print(f"varlen kernel {name} {heads}: {'ok' if why is None else why}")
        if why is None:
            ok.append(name)
    assert set(ok) - {"sdpa_segments"}, "no flash varlen kernel works on this GPU"
    print("chosen:", va.kernel_for(torch.device("cuda"), torch.bfloat16, *heads))


def test_varlen_attention_matches_masked_sdpa_in_bf16():
    from lmforge.model.kernels import varlen_attention as va
    from lmforge.model.patches import enable_varlen_attention
    from lmforge.registry import LOSSES

    model = _small_qwen(vocab=32000)
    model.train()
    batch = _packed_batch(32000)
    params = [p for p in model.parameters()]

    def run():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        torch.cuda.reset_peak_memory_stats()
        logits = model(**inputs, use_cache=False).logits
        loss = LOSSES.get("cross_entropy")(logits[:, :-1], batch["labels"][:, 1:])
        grads = torch.autograd.grad(loss, params)
        return loss.item(), grads, torch.cuda.max_memory_allocated() / 2**30

    loss_m, g_m, mem_m = run()
    line = enable_varlen_attention(model, required=True)
    print(line)
    loss_v, g_v, mem_v = run()
    cos = min(_cos(a, b) for a, b in zip(g_v, g_m))
    print(f"masked sdpa loss {loss_m:.5f} peak {mem_m:.2f} GiB; varlen loss {loss_v:.5f} peak {mem_v:.2f} GiB; "
          f"min grad cosine {cos:.5f}; kernels {va.chosen_kernels()}")
    assert abs(loss_v - loss_m) / loss_m < 5e-3
    assert cos > 0.995
    assert va.stats["varlen_calls"] > 0


def test_fused_ce_matches_plain_and_saves_memory():
    from lmforge.trainers import fused_ce as fc

    N, H, V = 8192, 896, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(N, H, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(V, H, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    labels[::7] = -100
    scale = torch.rand(N, device="cuda", generator=g) + 0.5

    def measure(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fn()
        grads = torch.autograd.grad(loss, (hidden, weight))
        torch.cuda.synchronize()
        return loss.item(), grads, (torch.cuda.max_memory_allocated() - base) / 2**30

    def plain():
        logits = hidden @ weight.T
        per_tok = F.cross_entropy(logits.float(), labels, reduction="none")
        return (per_tok * scale).sum() / (labels != -100).sum()

    def fused():
        return fc.fused_linear_cross_entropy(hidden, weight, labels, loss_scale=scale)

    fused()  # compile once outside the measurement
    lp, gp, mp = measure(plain)
    lf, gf, mf = measure(fused)
    print(f"plain loss {lp:.6f} extra peak {mp:.2f} GiB; fused loss {lf:.6f} extra peak {mf:.2f} GiB "
          f"({fc.kernel_status()}); grad cosine h {_cos(gf[0], gp[0]):.6f} w {_cos(gf[1], gp[1]):.6f}")
    assert abs(lf - lp) / lp < 1e-3
    assert _cos(gf[0], gp[0]) > 0.999 and _cos(gf[1], gp[1]) > 0.999
    assert mf < 0.5 * mp
    for name, fn in (("inplace", fc._ce_chunk_inplace), ("pointwise", fc._ce_chunk_pointwise)):
        logits = (hidden[:256] @ weight.T).detach()
        loss, grad = fn(logits, labels[:256].clamp(min=0), scale[:256], 0.0, True)
        ref_l, ref_g = fc._ce_chunk_inplace(logits, labels[:256].clamp(min=0), scale[:256], 0.0, True)
        assert torch.allclose(loss, ref_l, rtol=1e-5) and _cos(grad, ref_g) > 0.9999, name


def test_lean_layers_compiled_match_modules():
    import copy

    from lmforge.model.kernels import lean_layers as ll

    model = _small_qwen(vocab=1024, layers=1)
    layer = model.model.layers[0]
    lean = copy.deepcopy(layer)
    assert ll.patch_lean_layers(lean) == {"rms_norm": 2, "swiglu": 1}
    for name in ("input_layernorm", "mlp"):
        a, b = getattr(layer, name), getattr(lean, name)
        x = torch.randn(4, 1000, 896, device="cuda", dtype=torch.bfloat16).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        ya, yb = a(x), b(x2)
        gy = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, [x, *a.parameters()], gy)
        gb = torch.autograd.grad(yb, [x2, *b.parameters()], gy)
        out_err = (ya.float() - yb.float()).abs().max().item()
        cos = min(_cos(u, v) for u, v in zip(ga, gb))
        print(f"lean {name}: max output diff {out_err:.3g}, min grad cosine {cos:.6f} ({ll.kernel_status()})")
        assert out_err <= 2e-2 * (1 + ya.float().abs().max().item()) and cos > 0.999


def test_liger_path_runs():
    pytest.importorskip("liger_kernel")
    from types import SimpleNamespace

    from lmforge.model.patches import configure_for_training
    from lmforge.trainers.fused_ce import fused_linear_cross_entropy

    model = _small_qwen(vocab=32000)
    args = SimpleNamespace(use_liger_kernel=True, lean_layers="auto", varlen_attention="auto", packing=True,
                           attn_impl=None)
    lines = configure_for_training(model, args, on_gpu=True)
    print(lines)
    assert any("liger: RMSNorm" in x for x in lines)
    batch = _packed_batch(32000)
    from lmforge.trainers.output_head import resolve_output_head

    head, why = resolve_output_head(model)
    with head.returning_hidden_states():
        hidden = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    l_liger = fused_linear_cross_entropy(hidden, head.weight, targets, use_liger=True)
    l_ours = fused_linear_cross_entropy(hidden, head.weight, targets)
    l_liger.backward()
    print(f"liger fused loss {l_liger.item():.5f}, lmforge fused loss {l_ours.item():.5f}")
    assert abs(l_liger.item() - l_ours.item()) / l_ours.item() < 1e-3


def test_sft_defaults_take_the_fast_path_on_gpu(tmp_path):
    pytest.importorskip("datasets")
    from lmforge import TrainArguments, sft_main
    from lmforge.model.kernels import varlen_attention as va

    calls = va.stats["varlen_calls"]
    res = sft_main(TrainArguments(model="builtin:tiny", dataset=["builtin:arith#2000"], train_type="full",
                                  output_dir=str(tmp_path), add_version=False, max_steps=30, learning_rate=2e-3,
                                  per_device_train_batch_size=16, gradient_accumulation_steps=1, packing=True,
                                  max_length=512, logging_steps=10, report_to=["none"], plot=False,
                                  gradient_checkpointing=True, gradient_checkpointing_every=2))
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    print("sft losses", losses)
    assert res["trainer"]._fused_ce, "fused cross-entropy was not used"
    assert va.stats["varlen_calls"] > calls, "varlen attention was not used"
    assert losses[-1] < losses[0]


def test_8bit_adamw_runs(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("datasets")
    from lmforge import TrainArguments, sft_main

    res = sft_main(TrainArguments(model="builtin:tiny", dataset=["builtin:arith#256"], train_type="full",
                                  output_dir=str(tmp_path), add_version=False, max_steps=6, learning_rate=1e-3,
                                  per_device_train_batch_size=16, gradient_accumulation_steps=1, optim="adamw_bnb_8bit",
                                  logging_steps=3, report_to=["none"], plot=False))
    opt = res["trainer"].optimizer
    print("8-bit optimizer:", type(getattr(opt, "optimizer", opt)).__name__)
    assert "8bit" in type(getattr(opt, "optimizer", opt)).__name__.lower() or "bitsandbytes" in type(
        getattr(opt, "optimizer", opt)).__module__
