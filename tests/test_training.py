"""Training on builtin:tiny: each tuner learns and saves, packing is exact, a killed run resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge import TrainArguments, sft_main


def _losses(result):
    return [h["loss"] for h in result["log_history"] if "loss" in h]


def _args(tmp_path, **kw):
    base = dict(model="builtin:tiny", dataset=["builtin:self-cognition#64"], model_name=["Forge"],
                model_author=["Lab"], output_dir=str(tmp_path / "out"), max_steps=32, logging_steps=4,
                save_steps=16, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                learning_rate=3e-3, lr_scheduler_type="constant", warmup_ratio=0.0, report_to=["none"], plot=False)
    base.update(kw)
    return TrainArguments(**base)


@pytest.mark.parametrize("train_type,extra", [
    ("lora", {}),
    ("dora", {}),
    ("full", {"learning_rate": 1e-3}),
    ("freeze", {"freeze_parameters": ["model.embed_tokens", r"model\.layers\.[01]\."], "learning_rate": 1e-3}),
])
def test_each_tuner_learns_and_saves(tmp_path, train_type, extra):
    result = sft_main(_args(tmp_path, train_type=train_type, **extra))
    losses = _losses(result)
    assert losses[-1] < losses[0] * 0.9, losses
    ckpt = Path(result["last_checkpoint"])
    assert (ckpt / "lmforge_checkpoint.json").is_file() and (ckpt / "args.json").is_file()
    assert (ckpt / "tokenizer_config.json").is_file()
    if train_type in ("lora", "dora"):
        assert (ckpt / "adapter_model.safetensors").is_file()
    else:
        assert (ckpt / "model.safetensors").is_file()
    assert json.loads((ckpt / "args.json").read_text())["model"] == "builtin:tiny"


def test_lora_checkpoint_reloads_with_peft(tmp_path):
    from peft import PeftModel

    from lmforge.model import get_model_tokenizer

    result = sft_main(_args(tmp_path, max_steps=4, save_steps=4))
    trained = result["trainer"].model
    base, _ = get_model_tokenizer("builtin:tiny", device="cpu")
    reloaded = PeftModel.from_pretrained(base, result["last_checkpoint"])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    trained.eval()
    with torch.no_grad():
        assert torch.allclose(trained(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)


def test_packed_loss_equals_unpacked(tiny_model_tokenizer):
    from lmforge.dataset import encode_dataset, load_dataset
    from lmforge.dataset.packing import pack_dataset
    from lmforge.registry import LOSSES
    from lmforge.template import get_template
    from lmforge.trainers.collator import Collator

    model, tok = tiny_model_tokenizer
    model.eval()
    template = get_template(tok, max_length=256)
    template.set_mode("train")
    train, _ = load_dataset(["builtin:self-cognition#12", "builtin:arith#12"], model_name=["A"], model_author=["B"])
    ds = encode_dataset(train, template, cache=False)
    loss_fn = LOSSES.get("cross_entropy")

    def loss_of(batch):
        batch = dict(batch)
        labels = batch.pop("labels")
        with torch.no_grad():  # use_cache=False as in training: with a cache, transformers skips packed masks
            logits = model(**batch, use_cache=False).logits
        return loss_fn(logits[:, :-1], labels[:, 1:]).item()

    rows = [ds[i] for i in range(len(ds))]
    unpacked = loss_of(Collator(tok.pad_token_id)(rows))
    packed_ds = pack_dataset(ds, 256)
    assert len(packed_ds) < len(ds)
    packed = loss_of(Collator(tok.pad_token_id, padding_free=True)([packed_ds[i] for i in range(len(packed_ds))]))
    assert abs(packed - unpacked) / unpacked < 1e-5, (packed, unpacked)
    # Without restarting positions (plain concatenation) the loss differs: the check above is not vacuous.
    flat = Collator(tok.pad_token_id, padding_free=True)(rows)
    flat.pop("position_ids")
    assert abs(loss_of(flat) - unpacked) / unpacked > 1e-3


def test_packing_trains(tmp_path):
    result = sft_main(_args(tmp_path, packing=True, max_length=256, per_device_train_batch_size=2))
    losses = _losses(result)
    assert losses[-1] < losses[0]


def _cli(tmp_path, out, *extra):
    return [sys.executable, "-m", "lmforge.cli.main", "sft", "--model", "builtin:tiny",
            "--dataset", "builtin:arith#256", "--output_dir", str(out), "--add_version", "false",
            "--max_steps", "12", "--save_steps", "4", "--save_total_limit", "5", "--logging_steps", "1",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
            "--learning_rate", "2e-3", "--report_to", "none", "--plot", "false", *extra]


def _final_weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "adapter_model.safetensors"))


def test_killed_run_resumes_to_identical_weights(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cli(tmp_path, ref), check=True, env=env, capture_output=True)

    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(tmp_path, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "checkpoint-8" / "lmforge_checkpoint.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a real kill, mid-run
    proc.wait()
    assert (run / "checkpoint-8").is_dir(), "the run never reached step 8"
    assert not (run / "checkpoint-12" / "lmforge_checkpoint.json").exists(), "killed too late to test resume"

    # A half-written checkpoint (no completion marker) is ignored by 'last'.
    (run / "checkpoint-99").mkdir()
    (run / "checkpoint-99" / "trainer_state.json").write_text("{}")
    out = subprocess.run(_cli(tmp_path, run, "--resume_from_checkpoint", "last"), env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Ignoring incomplete checkpoint" in out.stderr
    a, b = _final_weights(ref / "checkpoint-12"), _final_weights(run / "checkpoint-12")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tokens_seen_counts_every_real_token(tmp_path):
    """num_input_tokens_seen (counted on the device, read at each log) = every token of every packed row
    trained on; end-of-text tokens that share the pad id are real tokens in a padding-free batch."""
    result = sft_main(_args(tmp_path, packing=True, max_length=256, per_device_train_batch_size=3, max_steps=-1,
                            num_train_epochs=2, logging_steps=1, save_steps=1000))
    trainer = result["trainer"]
    total = 2 * sum(len(r["input_ids"]) for r in trainer.train_dataset)
    seen = [h["num_input_tokens_seen"] for h in result["log_history"] if "loss" in h]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert seen[-1] == trainer.state.num_input_tokens_seen == total


def test_offloaded_activations_come_back_exactly(tiny_model_tokenizer):
    """The saved-tensor hooks of --activation_offloading: activations (tensors with a grad_fn) leave, weights
    stay, and forward + backward give bit-identical gradients (on CPU the round trip is host to host)."""
    from lmforge.trainers.offload import ActivationOffloader

    model, _ = tiny_model_tokenizer
    ids = torch.randint(5, 900, (2, 48))

    def grads(offloader=None):
        model.zero_grad()
        ctx = offloader() if offloader is not None else torch.enable_grad()
        with ctx:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    off = ActivationOffloader(min_bytes=0)
    kept = []
    pack = off.pack
    off.pack = lambda t: kept.append(pack(t)) or kept[-1]
    (l0, g0), (l1, g1) = grads(), grads(off)
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    params = {p.data_ptr() for p in model.parameters()}
    moved = [k for k in kept if isinstance(k, tuple)]
    assert off.offloaded_bytes > 0 and len(moved) > 10
    assert not any(k[2].data_ptr() in params for k in moved)  # never a weight
    assert any(not isinstance(k, tuple) and k.data_ptr() in params for k in kept)  # weights were saved in place


def test_activation_offloading_trains_the_same_run(tmp_path, monkeypatch):
    """`--activation_offloading true`: the same losses step for step as without it, with activations offloaded
    on every step (the size floor lowered so the tiny model's activations qualify)."""
    from lmforge.trainers.offload import ActivationOffloader

    base = _losses(sft_main(_args(tmp_path / "a", max_steps=6, logging_steps=1, train_type="full")))
    monkeypatch.setattr(ActivationOffloader, "MIN_BYTES", 0)
    moved = []
    pack = ActivationOffloader.pack
    monkeypatch.setattr(ActivationOffloader, "pack",
                        lambda self, t: (r := pack(self, t), moved.append(isinstance(r, tuple)))[0])
    off = _losses(sft_main(_args(tmp_path / "b", max_steps=6, logging_steps=1, train_type="full",
                                 activation_offloading=True)))
    assert sum(moved) > 6 * 10 and off == base
