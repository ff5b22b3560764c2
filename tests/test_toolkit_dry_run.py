"""``--dry_run``: every shipped preset plans without training; the plan's numbers are the ones training and
encoding really produce (steps, trainable parameters, lengths, truncation, labelled share); the memory
estimator's activation table is re-measured here, and it reproduces the GPU peaks recorded in
benchmarks/RESULTS.md."""
from __future__ import annotations

import json

from pathlib import Path

import pytest

from lmforge.arguments import RlhfArguments, TrainArguments
from lmforge.cli.main import main
from lmforge.presets import list_presets
from lmforge.trainers.memory import ACT_COEF, DROPOUT_COEF, PEFT_FORWARD_COEF, GiB, ModelShape, TrainPlan, estimate

DATA = {"dpo": "builtin:arith-preference#64", "kto": "builtin:arith-preference#64", "orpo": "builtin:arith-preference#64",
        "grpo-math": "builtin:arith-rl#64", "vl-lora": "builtin:shapes#64",
        "embedding": "builtin:arith-retrieval#64"}
MODEL = {"vl-lora": "builtin:tiny-vl"}
QUIET = dict(report_to=["none"], plot=False, save_steps=100_000, logging_steps=100)


@pytest.mark.parametrize("preset", [p for p in list_presets()], ids=lambda p: p["name"])
def test_every_shipped_preset_dry_runs(preset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = preset["commands"][-1] if preset["name"] in DATA and preset["name"] not in MODEL else preset["commands"][0]
    argv = [command, "--preset", preset["name"], "--model", MODEL.get(preset["name"], "builtin:tiny"), "--dry_run",
            "--dataset", DATA.get(preset["name"], "builtin:arith#64")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"{command} --dry_run: ok, nothing trained or written")
    assert "trainable of" in out and "peak GPU memory per device" in out
    assert not (tmp_path / "output").exists()  # nothing written


def _dry(**kw) -> dict:
    from lmforge.pipelines.sft import sft_main

    return sft_main(TrainArguments(model="builtin:tiny", dry_run=True, **QUIET, **kw))


@pytest.mark.parametrize("packing", [False, True])
def test_steps_and_parameters_are_what_training_does(tmp_path, packing):
    from lmforge.pipelines.sft import sft_main

    kw = dict(dataset=["builtin:arith#50"], per_device_train_batch_size=4, gradient_accumulation_steps=2,
              num_train_epochs=2, packing=packing, max_length=64 if packing else 2048, train_type="lora")
    plan = _dry(**kw)
    done = sft_main(TrainArguments(model="builtin:tiny", output_dir=str(tmp_path), **QUIET, **kw))
    assert plan["steps"]["steps"] == done["trainer"].state.global_step
    model = done["trainer"].model
    assert plan["parameters"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan["parameters"]["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("task,dataset", [("embedding", "builtin:arith-retrieval#40"),
                                          ("reranker", "builtin:arith-retrieval#40"),
                                          ("seq_cls", "builtin:intents#60")])
def test_task_dry_run_is_what_task_training_does(tmp_path, task, dataset, capsys):
    """Embedding models, rerankers and classifiers: the same steps and parameters as a real run, each row's
    query, positive and negatives counted as sequences, and no vocabulary-wide loss in the estimate."""
    from lmforge.pipelines.sft import sft_main

    kw = dict(dataset=[dataset], task_type=task, per_device_train_batch_size=4, gradient_accumulation_steps=2,
              num_train_epochs=1, train_type="lora", num_negatives=3 if task != "seq_cls" else None)
    plan = _dry(**kw)
    out = capsys.readouterr().out
    assert out.rstrip().endswith("sft --dry_run: ok, nothing trained or written")
    done = sft_main(TrainArguments(model="builtin:tiny", output_dir=str(tmp_path), **QUIET, **kw))
    assert plan["steps"]["steps"] == done["trainer"].state.global_step
    model = done["trainer"].model
    assert plan["parameters"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert plan["memory"]["loss"] == 0
    if task == "seq_cls":
        assert plan["sample"]["sequences_per_row"] == 1
    else:  # the query (or query + positive pair), the positive for an embedding model, 3 negatives
        assert plan["sample"]["sequences_per_row"] == (5 if task == "embedding" else 4)
        assert plan["memory"]["tokens_per_micro_batch"] >= 4 * plan["sample"]["sequences_per_row"] * 10


def _rows(path, n: int) -> None:
    with path.open("w") as fh:
        for i in range(n):
            q = "add these numbers " * (1 + i % 7)
            fh.write(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": "sum " * (1 + 3 * (i % 5))}]}) + "\n")


def test_lengths_truncation_and_labelled_share(tmp_path, tiny_tokenizer, capsys):
    from lmforge.dataset import encode_dataset, load_dataset
    from lmforge.template import get_template

    data = tmp_path / "rows.jsonl"
    _rows(data, 40)
    free = get_template(tiny_tokenizer)
    rows, _ = load_dataset([str(data)], shuffle=False)
    lengths = [free.encode(r)["length"] for r in rows]
    limit = sorted(lengths)[len(lengths) // 2]
    over = sum(n > limit for n in lengths)
    assert 0 < over < len(lengths)
    for strategy in ("right", "delete"):
        plan = _dry(dataset=[str(data)], max_length=limit, truncation_strategy=strategy)
        assert plan["sample"]["over_max_length"] == over and plan["length"]["max"] == max(lengths)
        enc = encode_dataset(rows, get_template(tiny_tokenizer, max_length=limit, truncation_strategy=strategy),
                             cache=False)
        assert plan["sample"]["dropped"] == len(rows) - len(enc)
        tokens = sum(len(x) for x in enc["input_ids"])
        labelled = sum(sum(t != -100 for t in x) for x in enc["labels"])
        assert plan["labelled_share"] == pytest.approx(labelled / tokens, abs=1e-4)
    capsys.readouterr()
    code = main(["sft", "--model", "builtin:tiny", "--dataset", str(data), "--max_length", str(limit),
                 "--truncation_strategy", "raise", "--dry_run"])
    err = capsys.readouterr().err
    assert code == 2 and "rows.jsonl:" in err and f"over --max_length {limit}" in err


def test_world_size_plan_without_relaunch(monkeypatch, tmp_path):
    monkeypatch.setenv("NPROC_PER_NODE", "4")  # a dry run plans for 4 processes in this one (no torchrun)
    one = _dry(dataset=["builtin:arith#64"], train_type="full", per_device_train_batch_size=2)
    assert one["steps"]["world_size"] == 4 and one["steps"]["gradient_accumulation"] == 2  # 16 rows a step
    sharded = _dry(dataset=["builtin:arith#64"], train_type="full", per_device_train_batch_size=2, fsdp="full_shard")
    assert sharded["memory"]["optimizer"] == pytest.approx(one["memory"]["optimizer"] / 4)
    assert sharded["memory"]["weights"] < one["memory"]["weights"]
    monkeypatch.chdir(tmp_path)
    assert main(["sft", "--model", "builtin:tiny", "--dataset", "builtin:arith#64", "--dry_run"]) == 0
    assert main(["pt", "--model", "builtin:tiny", "--dataset", "builtin:arith#64", "--dry_run"]) == 0
    assert not (tmp_path / "output").exists()


# ---------------------------------------------------------------------------- the memory estimator

def _saved_bytes_per_token_per_layer(lean: bool, tuner: str, dropout: float, device: str = "cpu", h: int = 192,
                                     kv_heads: int = 1, inter: int = 640, lean_lora: bool = True) -> float:
    """Bytes autograd keeps per token per decoder layer on lmforge's training path (bf16, autocast, fused loss),
    measured by saved-tensor hooks: two depths and two lengths, so per-layer and per-token constants cancel."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lmforge.model.patches import apply_lean_layers
    from lmforge.trainers.fused_ce import fused_linear_cross_entropy

    def saved(layers: int, T: int) -> int:
        cfg = Qwen2Config(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=h // 64,
                          num_key_value_heads=kv_heads, vocab_size=512, tie_word_embeddings=True)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
        if lean:
            apply_lean_layers(model)
        if tuner == "lora":
            from peft import LoraConfig, get_peft_model

            from lmforge.tuners.lean_lora import patch_lean_lora

            model = get_peft_model(model, LoraConfig(r=8, lora_dropout=dropout, target_modules="all-linear"))
            if lean_lora:
                patch_lean_lora(model)
        base = model.get_base_model() if tuner == "lora" else model
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen.setdefault(ptr, t.untyped_storage().nbytes())
            return t

        ids = torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device, dtype=torch.bfloat16):
            hidden = base.model(input_ids=ids).last_hidden_state
            fused_linear_cross_entropy(hidden[:, :-1], base.lm_head.weight, ids[:, 1:])
        return sum(seen.values())

    return (saved(2, 64) - saved(1, 64) - saved(2, 32) + saved(1, 32)) / (2 * 32)


@pytest.mark.parametrize("lean,tuner,dropout,lean_lora", [(True, "full", 0.0, True), (False, "full", 0.0, True),
                                                          (True, "lora", 0.0, True), (False, "lora", 0.0, True),
                                                          (True, "lora", 0.05, True), (True, "lora", 0.05, False)])
def test_activation_table_matches_saved_tensors(lean, tuner, dropout, lean_lora):
    _check_table(lean, tuner, dropout, "cpu", lean_lora)


def _check_table(lean: bool, tuner: str, dropout: float, device: str, lean_lora: bool = True) -> None:
    if device == "cuda":  # a fresh process: Liger's patches (other GPU tests) replace transformers' layers globally
        import subprocess
        import sys

        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_toolkit_dry_run import "
                f"_saved_bytes_per_token_per_layer as f; print(f({lean}, {tuner!r}, {dropout}, 'cuda', "
                f"lean_lora={lean_lora}))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        measured = float(out.stdout.strip().splitlines()[-1])
    else:
        measured = _saved_bytes_per_token_per_layer(lean, tuner, dropout, device, lean_lora=lean_lora)
    ch, ckv, ci = ACT_COEF[("adapter" if tuner == "lora" else "full", lean)]
    if tuner == "lora" and not lean_lora:
        ch, ckv, ci = ch + PEFT_FORWARD_COEF[0], ckv + PEFT_FORWARD_COEF[1], ci + PEFT_FORWARD_COEF[2]
    if dropout:
        dh, dkv, di = DROPOUT_COEF[(device, lean_lora)]
        ch, ckv, ci = ch + dh, ckv + dkv, ci + di
    table = ch * 192 + ckv * 64 + ci * 640
    assert table == pytest.approx(measured, rel=0.06), (device, lean, tuner, dropout, measured, table)


@pytest.mark.gpu
@pytest.mark.parametrize("lean,tuner,dropout,lean_lora", [(True, "full", 0.0, True), (True, "lora", 0.0, True),
                                                          (True, "lora", 0.05, True), (False, "lora", 0.05, True),
                                                          (True, "lora", 0.05, False)])
def test_activation_table_matches_saved_tensors_on_cuda(lean, tuner, dropout, lean_lora):
    """CUDA's fused dropout keeps a 1-byte mask where the CPU kernel keeps float32 noise (the 7B LoRA estimate
    was 1.31x its measured peak while the CPU coefficient was used for both)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _check_table(lean, tuner, dropout, "cuda", lean_lora)


def _qwen_shape(spec: dict) -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        return ModelShape.from_model(AutoModelForCausalLM.from_config(Qwen2Config(**spec), dtype=torch.bfloat16))


QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)


def test_estimates_match_recorded_gpu_peaks():
    """benchmarks/RESULTS.md, 2026-11-23 (H100, lmforge's path: packed bins, varlen attention, fused loss, Liger
    RMSNorm/SwiGLU, which keep what the lean layers keep; LoRA r16 without dropout) and 2026-11-29 (H200,
    benchmarks/bench_dry_run_memory.py: LoRA r16 with lmforge's default dropout 0.05): measured peak GiB. The LoRA
    peaks up to 2026-11-29 were measured with peft's own forward (``lean_lora=False``, before tuners/lean_lora.py);
    the last two with lean LoRA (the dropout keeping a mask, not a copy)."""
    small, big = _qwen_shape(QWEN25_05B), _qwen_shape(QWEN25_7B)
    lora16 = 28 * 16 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    cases = [(small, dict(train_type="full", trainable=small.params, head_trainable=True, tokens=16384), 18.1),
             (small, dict(train_type="full", trainable=small.params, head_trainable=True, tokens=16384,
                          checkpointing=True, checkpoint_every=4), 14.6),
             (big, dict(train_type="lora", trainable=lora16, tokens=8192, lean_lora=False), 56.0),
             (big, dict(train_type="lora", trainable=lora16, tokens=8192, checkpointing=True, checkpoint_every=2,
                        lean_lora=False), 36.7),
             (small, dict(train_type="full", trainable=small.params, head_trainable=True, tokens=16384), 19.24),
             (big, dict(train_type="lora", trainable=lora16, tokens=4096, lora_dropout=0.05, lean_lora=False), 40.28),
             (big, dict(train_type="lora", trainable=lora16, tokens=4096, lora_dropout=0.05), 37.25),   # 2026-12-01
             (big, dict(train_type="lora", trainable=lora16, tokens=8192, checkpointing=True, checkpoint_every=3,
                        lora_dropout=0.0), 38.93)]   # bench_train's lean-LoRA row, 2026-12-01
    for shape, kw, measured in cases:
        peak = estimate(shape, TrainPlan(padded=False, **kw))["peak"] / GiB
        assert peak == pytest.approx(measured, rel=0.1), (kw, peak, measured)


def test_estimator_terms():
    shape = _qwen_shape(QWEN25_7B)
    base = dict(train_type="lora", trainable=20_000_000, tokens=4096)
    lora = estimate(shape, TrainPlan(**base))
    assert lora["weights"] == pytest.approx(shape.params * 2 + 4 * 20_000_000)
    assert lora["optimizer"] == 2 * 4 * 20_000_000 and lora["gradients"] == 4 * 20_000_000
    qlora = estimate(shape, TrainPlan(**{**base, "train_type": "qlora"}))
    # 4-bit decoder weights, bf16 embeddings, head and norms, float32 adapters; float32 on a float16 base
    assert qlora["weights"] == pytest.approx(0.516 * shape.linear_params + 2 * (shape.params - shape.linear_params)
                                             + 4 * 20_000_000)
    fp16 = estimate(shape, TrainPlan(**{**base, "train_type": "qlora", "float16": True}))
    assert fp16["weights"] - qlora["weights"] == pytest.approx(2 * (shape.params - shape.linear_params))
    ckpt = estimate(shape, TrainPlan(**base, checkpointing=True))
    assert ckpt["activations"] < 0.1 * lora["activations"]
    eight = estimate(shape, TrainPlan(**{**base, "optim": "paged_adamw_8bit"}))
    assert eight["optimizer"] == 2 * 20_000_000
    offload = estimate(shape, TrainPlan(**base, world=8, deepspeed="zero3_offload"))
    assert offload["optimizer"] == 0 and offload["weights"] < lora["weights"] / 4
    assert RlhfArguments(rlhf_type="dpo", dry_run=True).dry_run
