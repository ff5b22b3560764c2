"""Training plugins: losses, metrics, optimizers, callbacks, plotting, and their registries.

Real tensors on the CPU, a tiny real Qwen2 with a peft LoRA, no network.
"""
from __future__ import annotations

import io
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from lmforge.registry import CALLBACKS, LOSSES, METRICS, OPTIMIZERS, load_plugins
from lmforge.trainers.losses import chunked_cross_entropy, cross_entropy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _batch(seed: int = 0, B: int = 3, T: int = 7, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    return logits, labels


# ---------------------------------------------------------------- losses

def test_cross_entropy_matches_torch_by_hand():
    logits, labels = _batch()
    got = cross_entropy(logits, labels)
    mask = labels != -100
    per_token = -torch.log_softmax(logits[mask], -1).gather(1, labels[mask][:, None]).squeeze(1)
    assert torch.allclose(got, per_token.mean(), atol=1e-6)
    assert torch.allclose(got, F.cross_entropy(logits.flatten(0, 1), labels.flatten()), atol=1e-6)
    assert got.dtype == torch.float32
    # half-precision logits are upcast: same value as computing in float32
    assert torch.allclose(cross_entropy(logits.bfloat16(), labels),
                          F.cross_entropy(logits.bfloat16().float().flatten(0, 1), labels.flatten()), atol=1e-6)


def test_cross_entropy_loss_scale_weights_tokens():
    logits, labels = _batch(1)
    scale = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) * 2
    mask = labels != -100
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    expected = (per_token * scale)[mask].sum() / mask.sum()
    assert torch.allclose(cross_entropy(logits, labels, loss_scale=scale), expected, atol=1e-6)
    # scale 1 everywhere is plain CE; scale 0 on a token removes it from the sum but not the count
    assert torch.allclose(cross_entropy(logits, labels, loss_scale=torch.ones_like(scale)), cross_entropy(logits, labels))
    zero_first = torch.ones_like(scale)
    zero_first[1, 0] = 0
    expected = per_token[mask & (zero_first > 0)].sum() / mask.sum()
    assert torch.allclose(cross_entropy(logits, labels, loss_scale=zero_first), expected, atol=1e-6)


def test_num_items_in_batch_makes_accumulation_exact():
    """Two micro-batches with different label counts, each divided by the total count, add up to
    the loss (and gradient) of the whole batch; a per-micro-batch mean would not."""
    logits, labels = _batch(2, B=4)
    full = cross_entropy(logits, labels)
    (g_full,) = torch.autograd.grad(full, logits)

    n_total = int((labels != -100).sum())
    for n_items in (n_total, torch.tensor(n_total)):
        acc = cross_entropy(logits[:1], labels[:1], num_items_in_batch=n_items) + \
            cross_entropy(logits[1:], labels[1:], num_items_in_batch=n_items)
        (g_acc,) = torch.autograd.grad(acc, logits)
        assert torch.allclose(acc, full, atol=1e-6)
        assert torch.allclose(g_acc, g_full, atol=1e-7)
    means = (cross_entropy(logits[:1], labels[:1]) + 3 * cross_entropy(logits[1:], labels[1:])) / 4
    assert not torch.allclose(means, full, atol=1e-4)
    # a micro-batch with no labelled token contributes 0, not NaN, and still backpropagates
    empty = cross_entropy(logits, torch.full_like(labels, -100))
    assert empty.item() == 0.0 and empty.requires_grad


def test_example_losses():
    logits, labels = _batch(4)
    ls = LOSSES.get("label_smoothing_ce")(logits, labels)
    assert torch.allclose(ls, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=0.1), atol=1e-6)
    foc = LOSSES.get("focal")(logits, labels)
    mask = labels != -100
    logp = torch.log_softmax(logits[mask], -1).gather(1, labels[mask][:, None]).squeeze(1)
    assert torch.allclose(foc, (-(1 - logp.exp()) ** 2 * logp).mean(), atol=1e-6)
    assert foc < cross_entropy(logits, labels)


@pytest.mark.parametrize("chunk_size", [4, 7, 4096])
def test_chunked_cross_entropy_equals_full(chunk_size):
    g = torch.Generator().manual_seed(5)
    N, H, V = 23, 16, 50
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 5, 6, 20]] = -100
    scale = torch.rand(N, generator=g) + 0.5

    s, n = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk_size, loss_scale=scale)
    gh, gw = torch.autograd.grad(s / n, (hidden, weight))

    ref_tok = F.cross_entropy(hidden @ weight.T, labels, reduction="none")  # 0 at ignored rows
    ref = (ref_tok * scale).sum()
    rh, rw = torch.autograd.grad(ref / (labels != -100).sum(), (hidden, weight))
    assert int(n) == N - 4
    assert torch.allclose(s, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gh, rh, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)

    # frozen output embedding (LoRA): only the hidden-state gradient is formed
    s2, _ = chunked_cross_entropy(hidden, weight.detach(), labels, chunk_size=chunk_size)
    (gh2,) = torch.autograd.grad(s2, hidden)
    (rh2,) = torch.autograd.grad(F.cross_entropy(hidden @ weight.detach().T, labels, reduction="sum"), hidden)
    assert torch.allclose(gh2, rh2, atol=1e-5)


def test_chunked_cross_entropy_never_builds_full_logits():
    """No tensor made in the forward or backward pass is as large as the [N, V] logits."""
    from tests.test_fused_ce import LargestTensor

    g = torch.Generator().manual_seed(6)
    N, H, V, chunk = 40, 8, 30, 16
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    with LargestTensor():
        s, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        s.backward()
    assert 0 < LargestTensor.numel <= chunk * V < N * V
    with LargestTensor():  # the spy does see a full computation's logits
        F.cross_entropy(hidden @ weight.T, labels).backward()
    assert LargestTensor.numel == N * V


# ---------------------------------------------------------------- metrics

def _onehot_logits(pred_next: list[list[int]], V: int = 6) -> torch.Tensor:
    """logits[b, t] peaks at pred_next[b][t]: the model's guess for the token at t+1."""
    return F.one_hot(torch.tensor(pred_next), V).float() * 5.0


def test_token_accuracy_on_hand_made_logits():
    from transformers import EvalPrediction

    # unshifted HF labels: labels[t] is predicted by logits[t-1]
    labels = torch.tensor([[-100, -100, 3, 4, 5],
                           [-100, 1, 2, -100, -100]])
    logits = _onehot_logits([[0, 3, 0, 5, 0],   # predicts 3 for t=2 (right), 0 for t=3 (wrong), 5 for t=4 (right)
                             [1, 2, 0, 0, 0]])  # right for t=1 and t=2: the whole row
    metric = METRICS.get("token_accuracy")()
    pred = metric.preprocess(logits, labels)
    assert pred.shape == labels.shape and pred[:, 0].eq(-100).all()
    out = metric.compute(EvalPrediction(predictions=pred.numpy(), label_ids=labels.numpy()))
    assert out == {"token_acc": pytest.approx(4 / 5)}
    # raw logits (no preprocess) give the same answer
    assert metric.compute(EvalPrediction(predictions=logits.numpy(), label_ids=labels.numpy())) == out
    # batch_eval_metrics: counts accumulate over batches, the result comes on the last
    assert metric.compute(EvalPrediction(pred[:1].numpy(), labels[:1].numpy()), compute_result=False) == {}
    assert metric.compute(EvalPrediction(pred[1:].numpy(), labels[1:].numpy()), compute_result=True) == out

    em = METRICS.get("exact_match_rows")()
    res = em.compute(EvalPrediction(em.preprocess(logits, labels).numpy(), labels.numpy()))
    assert res["exact_match"] == pytest.approx(1 / 2) and res["token_acc"] == pytest.approx(4 / 5)


# ---------------------------------------------------------------- optimizers

def _tiny_lora_model():
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=100)
    model = transformers.Qwen2ForCausalLM(cfg)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           modules_to_save=["lm_head"])
    model = peft.get_peft_model(model, lora)
    for n, p in model.named_parameters():  # train the norms and the q bias too, to check their decay
        if "norm" in n or "q_proj.base_layer.bias" in n:
            p.requires_grad_(True)
    return model


def test_multi_lr_groups_and_default():
    model = _tiny_lora_model()
    args = types.SimpleNamespace(learning_rate=1e-4, weight_decay=0.1)
    opt = OPTIMIZERS.get("multi_lr")(model, args)
    assert isinstance(opt, torch.optim.AdamW)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(group_of) == {id(p) for p in trainable.values()}  # every trainable param once, frozen ones never
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)      # the rate transformers logs

    seen = set()
    for n, p in trainable.items():
        g = group_of[id(p)]
        if "lm_head" in n:
            kind, lr = "embedding", 1e-5
        elif "lora_B" in n:
            kind, lr = "lora_B", 1.6e-3
        else:
            kind, lr = "base", 1e-4
        assert g["lr"] == pytest.approx(lr), n
        assert g["name"].startswith(kind), (n, g["name"])
        no_decay = "norm" in n or n.endswith("bias")
        assert g["weight_decay"] == (0.0 if no_decay else 0.1), n
        seen.add((kind, no_decay))
    assert seen == {("embedding", False), ("lora_B", False), ("base", False), ("base", True)}

    opt = OPTIMIZERS.get("default")(model, types.SimpleNamespace(learning_rate=2e-5, weight_decay=0.01))
    assert {g["lr"] for g in opt.param_groups} == {2e-5}
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    # one step runs and moves a lora_B matrix off zero
    out = model(input_ids=torch.randint(0, 100, (2, 6)), labels=torch.randint(0, 100, (2, 6)))
    out.loss.backward()
    opt.step()
    b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    assert b.abs().sum() > 0


# ---------------------------------------------------------------- plotting

def _history(with_eval: bool = True) -> list[dict]:
    hist = []
    for step in range(5, 205, 5):
        hist.append({"loss": 3.0 * math.exp(-step / 80) + 0.05 * math.sin(step), "grad_norm": 1.0,
                     "learning_rate": 1e-4 * min(1.0, step / 20), "epoch": step / 200, "step": step})
        if with_eval and step % 50 == 0:
            hist.append({"eval_loss": 3.0 * math.exp(-step / 90), "eval_token_acc": step / 250,
                         "eval_runtime": 1.2, "eval_samples_per_second": 80.0, "epoch": step / 200, "step": step})
    hist.append({"train_runtime": 12.0, "train_loss": 1.0, "epoch": 1.0, "step": 200})
    return hist


def test_plot_history_writes_pngs(tmp_path):
    from lmforge.trainers.plotting import main, plot_history

    paths = plot_history(_history(), tmp_path / "run")
    names = {p.name for p in paths}
    assert {"train_loss.png", "eval_loss.png", "learning_rate.png", "eval_token_acc.png"} <= names
    assert "eval_runtime.png" not in names and "eval_samples_per_second.png" not in names
    for p in paths:
        assert p.is_file() and p.read_bytes()[:8] == PNG_MAGIC

    # no eval: no eval_loss.png; the CLI reads logging.jsonl (with a resumed run's repeated steps)
    run = tmp_path / "run2"
    run.mkdir()
    lines = [json.dumps(e) for e in _history(with_eval=False)[:10]] + ["{broken"]
    lines += [json.dumps(e) for e in _history(with_eval=False)[5:]]
    (run / "logging.jsonl").write_text("\n".join(lines) + "\n")
    written = main([str(run)])
    assert {p.name for p in written} == {"train_loss.png", "learning_rate.png", "grad_norm.png"}
    from lmforge.trainers.plotting import load_history
    steps = [e["step"] for e in load_history(run) if "loss" in e]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) == 40


# ---------------------------------------------------------------- callbacks

def _state(**kw):
    from transformers import TrainerControl, TrainerState

    state = TrainerState(max_steps=100, **kw)
    return state, TrainerControl()


def test_callbacks(tmp_path):
    args = types.SimpleNamespace(output_dir=str(tmp_path), fp16=False, logging_steps=5)

    # jsonl_logger: one JSON line per log, strict JSON even for NaN
    state, control = _state()
    cb = CALLBACKS.get("jsonl_logger")()
    state.global_step = 5
    cb.on_log(args, state, control, logs={"loss": 1.5, "learning_rate": torch.tensor(1e-4)})
    state.global_step = 10
    cb.on_log(args, state, control, logs={"loss": float("nan")})
    rows = [json.loads(line) for line in (tmp_path / "logging.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 5, "loss": 1.5, "learning_rate": pytest.approx(1e-4)}
    assert rows[1] == {"step": 10, "loss": "NaN"}

    # nan_guard stops on a non-finite loss or grad norm, not on a finite one
    guard = CALLBACKS.get("nan_guard")()
    guard.on_log(args, state, control, logs={"loss": 2.0, "grad_norm": 1.0})
    assert not control.should_training_stop
    guard.on_log(args, state, control, logs={"loss": 2.0, "grad_norm": float("inf")})
    assert control.should_training_stop

    # progress without a terminal: one plain line per log, eval results on their own line, no bar
    stream = io.StringIO()
    state, control = _state(num_input_tokens_seen=0)
    prog = CALLBACKS.get("progress")(stream=stream)
    prog.on_train_begin(args, state, control)
    for step in range(1, 11):
        state.global_step, state.num_input_tokens_seen = step, step * 256
        prog.on_step_end(args, state, control)
        if step % 5 == 0:
            prog.on_log(args, state, control, logs={"loss": 2.0 / step, "learning_rate": 1e-4, "epoch": 0.1})
    prog.on_log(args, state, control, logs={"eval_loss": 0.5, "eval_token_acc": 0.75})
    prog.on_train_end(args, state, control)
    out = stream.getvalue().splitlines()
    assert len(out) == 3, out
    assert out[0].startswith("step 5/100 loss=0.4 lr=0.0001 tok/s=") and "eta=" in out[0]
    assert "eval_loss=0.5" in out[2] and "eval_token_acc=0.75" in out[2]

    # progress with a bar (forced): eval results still come out as a line
    stream = io.StringIO()
    prog = CALLBACKS.get("progress")(use_bar=True, stream=stream)
    state.global_step, state.num_input_tokens_seen = 0, 0
    prog.on_train_begin(args, state, control)
    state.global_step, state.num_input_tokens_seen = 5, 1280
    prog.on_step_end(args, state, control)
    assert "tok/s" not in prog.postfix  # the token count is read at log lines: tok/s is set there
    prog.on_log(args, state, control, logs={"loss": 1.0})
    assert float(prog.postfix["tok/s"]) > 0
    prog.on_log(args, state, control, logs={"eval_loss": 0.25})
    prog.on_train_end(args, state, control)
    assert "eval_loss=0.25" in stream.getvalue()

    # plot writes into output_dir at the end of training
    state.log_history = _history()
    CALLBACKS.get("plot")().on_train_end(args, state, control)
    assert (tmp_path / "train_loss.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------- registries and plugins

def test_registry_lookups_and_suggestions():
    assert LOSSES.get("cross_entropy") is cross_entropy
    assert {"cross_entropy", "label_smoothing_ce", "focal"} <= set(LOSSES.names())
    assert {"token_accuracy", "exact_match_rows"} <= set(METRICS.names())
    assert {"default", "multi_lr"} <= set(OPTIMIZERS.names())
    assert {"progress", "plot", "nan_guard", "jsonl_logger"} <= set(CALLBACKS.names())
    with pytest.raises(KeyError, match="Did you mean 'cross_entropy'"):
        LOSSES.get("cross_entropi")
    with pytest.raises(KeyError, match="Did you mean 'multi_lr'"):
        OPTIMIZERS.get("multilr")


def test_external_plugin_registers_a_loss(tmp_path):
    plugin = tmp_path / "my_loss_plugin.py"
    plugin.write_text(
        "import torch.nn.functional as F\n"
        "from lmforge.registry import LOSSES\n"
        "from lmforge.trainers.losses import token_loss\n\n"
        "@LOSSES.register('double_ce')\n"
        "@token_loss\n"
        "def double_ce(logits, targets):\n"
        "    return 2 * F.cross_entropy(logits, targets, reduction='none')\n"
    )
    assert "double_ce" not in LOSSES
    load_plugins([str(plugin)])
    logits, labels = _batch(7)
    assert torch.allclose(LOSSES.get("double_ce")(logits, labels), 2 * cross_entropy(logits, labels), atol=1e-6)
