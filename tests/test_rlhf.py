"""Preference training: arguments, data, collator, sequence log-probs, and short runs of every objective."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.arguments import ArgumentError, RlhfArguments, parse_args

# ----------------------------------------------------------------------------- arguments


def test_loss_type_names_the_preference_variant():
    args = RlhfArguments(model="m", loss_type="ipo")
    assert args.pref_loss_type == ["ipo"] and args.loss_type is None  # the sft LOSSES registry never sees "ipo"
    assert args.average_log_probs  # IPO works on length-averaged log-probs
    assert RlhfArguments(model="m").resolved_loss_type == "sigmoid"
    with pytest.raises(ArgumentError, match="must be one of"):
        RlhfArguments(model="m", loss_type="cross_entropy")
    with pytest.raises(ArgumentError, match="no loss variants"):
        RlhfArguments(model="m", rlhf_type="orpo", loss_type="ipo")
    with pytest.raises(ArgumentError, match="precompute"):
        RlhfArguments(model="m", rlhf_type="kto", precompute_ref_log_probs=True)


def test_per_objective_defaults():
    assert RlhfArguments(rlhf_type="simpo").resolved_beta == 2.0 and RlhfArguments().resolved_beta == 0.1
    assert RlhfArguments(rlhf_type="cpo").nll_weight == 1.0 and RlhfArguments(rlhf_type="simpo").nll_weight == 0.0
    assert RlhfArguments(rlhf_type="simpo", cpo_alpha=0.5).nll_weight == 0.5  # CPO-SimPO
    assert RlhfArguments(rlhf_type="orpo").nll_weight == 1.0 and RlhfArguments(rpo_alpha=1.0).nll_weight == 1.0
    assert RlhfArguments(rlhf_type="simpo").average_log_probs and not RlhfArguments(rlhf_type="cpo").average_log_probs


def test_help_renders():
    from lmforge.arguments.base import build_parser

    text = build_parser(RlhfArguments, "lmforge rlhf").format_help()  # a stray % in a help text breaks it
    assert "--teacher_model" in text and "--async_generate" in text and "--loss_weights" in text


def test_cli_flags():
    args = parse_args(RlhfArguments, ["--rlhf_type", "dpo", "--model", "builtin:tiny", "--loss_type", "hinge",
                                      "--beta", "0.2", "--rpo_alpha", "1", "--dataset", "builtin:arith-preference"])
    assert (args.rlhf_type, args.pref_loss_type, args.beta, args.rpo_alpha) == ("dpo", ["hinge"], 0.2, 1.0)
    args = parse_args(RlhfArguments, ["--model", "m", "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5"])
    assert args.resolved_loss_types == ["sigmoid", "sft"] and args.resolved_loss_weights == [1.0, 0.5]
    for bad, match in ((dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "2 --loss_type"),
                       (dict(loss_type="sft"), "alone"), (dict(ld_alpha=2.0), "ld_alpha"),
                       (dict(rlhf_type="cpo", loss_type=["sigmoid", "hinge"]), "a mix")):
        with pytest.raises(ArgumentError, match=match):
            RlhfArguments(model="m", **bad)
    with pytest.raises(SystemExit):
        parse_args(RlhfArguments, ["--rlhf_type", "ppo"])


# ----------------------------------------------------------------------------- data


def test_arith_preference_rows():
    from lmforge.dataset import generate_arith, load_dataset
    from lmforge.registry import DATASETS
    from lmforge.rlhf.data import ERROR_KINDS, arith_preference_rows

    assert "arith-preference" in DATASETS
    rows = arith_preference_rows()
    assert rows == arith_preference_rows()  # deterministic
    assert len(rows) == len(generate_arith())  # every train question once
    kinds = {r["error_kind"] for r in rows}
    assert kinds == set(ERROR_KINDS)
    for r in rows[:500]:
        chosen, rejected = r["messages"][-1]["content"], r["rejected_response"]
        assert chosen == r["solution"] and rejected != chosen and int(rejected) >= 0
        if r["error_kind"] == "off_by_one":
            assert abs(int(rejected) - int(chosen)) == 1
        if r["error_kind"] == "off_by_ten":
            assert abs(int(rejected) - int(chosen)) == 10
    test, _ = load_dataset(["builtin:arith-preference:test"])
    held_out = {r["messages"][0]["content"] for r in generate_arith(split="test")}
    assert {m[0]["content"] for m in test["messages"]} == held_out


def test_plausible_wrong_answer_kinds():
    from lmforge.rlhf.data import _no_carry, _swap_digits, plausible_wrong_answer

    assert _no_carry(37, "+", 45) == 72   # 7+5 = 12 -> 2, carry dropped: 3+4 = 7
    assert _no_carry(52, "-", 17) == 45   # |2-7| = 5, 5-1 = 4: the borrow forgotten
    assert _swap_digits(82) == 28 and _swap_digits(7) is None and _swap_digits(33) is None
    for q in [(0, "-", 0), (3, "+", 4), (99, "+", 99), (50, "-", 49)]:
        wrong, kind = plausible_wrong_answer(*q)
        right = q[0] + q[2] if q[1] == "+" else q[0] - q[2]
        assert wrong != right and wrong >= 0 and kind


def test_pairs_from_samples():
    from lmforge.rlhf.data import pairs_from_samples

    rows = [{"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}],
             "solution": "2"},
            {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "solution": "4"},
            {"messages": [{"role": "user", "content": "What is 3 + 3?"}], "solution": "6"}]
    pairs = pairs_from_samples(rows, [["3", "2"], ["5", "7"], ["6", "6"]])
    assert [(p["messages"][-1]["content"], p["rejected_response"]) for p in pairs] == [("2", "3"), ("4", "5")]
    assert pairs[0]["messages"][0]["content"] == "What is 1 + 1?" and pairs[1]["solution"] == "4"


def test_kto_unpaired_expands_pairs():
    import datasets

    from lmforge.dataset import load_dataset
    from lmforge.pipelines.rlhf import kto_unpaired

    ds, _ = load_dataset(["builtin:arith-preference#3"])
    out = kto_unpaired(ds)
    assert len(out) == 6 and out["label"] == [True, False] * 3
    assert out[1]["messages"][-1]["content"] == ds[0]["rejected_response"] and out[1]["rejected_response"] is None
    labelled = datasets.Dataset.from_list([{**ds[0], "label": False, "rejected_response": None}])
    assert kto_unpaired(labelled)["label"] == [False]


# ----------------------------------------------------------------------------- collator and log-probs


def _rows():
    return [{"chosen_input_ids": [1, 2, 3, 4], "chosen_labels": [-100, -100, 3, 4],
             "rejected_input_ids": [1, 2, 5], "rejected_labels": [-100, -100, 5], "ref_chosen_logps": -1.0,
             "ref_rejected_logps": -2.0},
            {"chosen_input_ids": [1, 6], "chosen_labels": [-100, 6],
             "rejected_input_ids": [1, 7, 8, 9, 9], "rejected_labels": [-100, 7, 8, 9, 9], "ref_chosen_logps": -3.0,
             "ref_rejected_logps": -4.0}]


def test_pair_collator_padded_and_padding_free():
    from lmforge.rlhf.collator import PreferenceCollator

    batch = PreferenceCollator(0)(_rows())
    assert batch["input_ids"].shape == (4, 5)  # chosen 0, chosen 1, rejected 0, rejected 1
    assert batch["input_ids"][2].tolist() == [1, 2, 5, 0, 0] and batch["attention_mask"][2].tolist() == [1, 1, 1, 0, 0]
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -3.0]
    flat = PreferenceCollator(0, padding_free=True)(_rows())
    assert flat["input_ids"].shape == (1, 14) and "attention_mask" not in flat
    assert flat["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2, 3, 4]


def test_kto_collator_builds_mismatched_pairs():
    from lmforge.rlhf.collator import PreferenceCollator, completion_start

    assert completion_start([-100, -100, 5, 6, -100]) == 2
    assert completion_start([-100, 3, -100, 5, 6]) == 3  # the last reply, not an earlier turn
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, -100, 3], "label": True},
            {"input_ids": [4, 5, 6, 7], "labels": [-100, -100, 6, 7], "label": False}]
    batch = PreferenceCollator(0, kind="kto")(rows)
    assert batch["label"].tolist() == [True, False]
    # prompt 0 + completion 1, prompt 1 + completion 0
    assert batch["kl_input_ids"].tolist() == [[1, 2, 6, 7], [4, 5, 3, 0]]
    assert batch["kl_labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, 3, -100]]
    with pytest.raises(KeyError, match="label"):
        PreferenceCollator(0, kind="kto")([{"input_ids": [1], "labels": [1]}])


def test_sequence_log_probs_by_hand():
    from lmforge.rlhf.trainer import sequence_log_probs

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[-100, 2, 3, -100], [-100, -100, 5, -100]])
    got = sequence_log_probs(logits, labels)
    lp = logits.log_softmax(-1)
    want = [lp[0, 0, 2] + lp[0, 1, 3], lp[1, 1, 5]]
    assert got.sums.tolist() == pytest.approx([float(w) for w in want], abs=1e-5)
    assert got.counts.tolist() == [2.0, 1.0]
    assert got.logps(average=True).tolist() == pytest.approx([float(want[0]) / 2, float(want[1])], abs=1e-5)


def test_padded_and_padding_free_log_probs_agree(tiny_model_tokenizer):
    from lmforge.rlhf.collator import PreferenceCollator
    from lmforge.rlhf.trainer import _model_inputs, sequence_log_probs

    model, _ = tiny_model_tokenizer
    model.eval()
    scores = []
    for padding_free in (False, True):
        batch = PreferenceCollator(0, padding_free=padding_free)(_rows())
        with torch.no_grad():
            logits = model(**_model_inputs(batch), use_cache=False).logits
        scores.append(sequence_log_probs(logits, batch["labels"], batch.get("position_ids")))
    assert scores[0].sums.tolist() == pytest.approx(scores[1].sums.tolist(), abs=1e-4)
    assert scores[0].counts.tolist() == scores[1].counts.tolist() == [2.0, 1.0, 1.0, 4.0]


# ----------------------------------------------------------------------------- end-to-end runs


def _run(tmp_path: Path, **kw):
    from lmforge import rlhf_main

    base = dict(model="builtin:tiny", dataset=["builtin:arith-preference#16"], output_dir=str(tmp_path / "out"),
                add_version=False, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                learning_rate=5e-3, logging_steps=1, save_steps=1000, report_to=["none"], plot=False, lora_rank=8)
    base.update(kw)
    return rlhf_main(RlhfArguments(**base))


def _train_logs(result):
    return [h for h in result["log_history"] if "loss" in h]


def test_lora_dpo_end_to_end(tmp_path):
    """A tiny LoRA DPO run: the loss falls, rewards are logged, the reference is the adapter-free base."""
    result = _run(tmp_path, max_steps=20, dataset=["builtin:arith-preference#8"], per_device_train_batch_size=8,
                  val_dataset=["builtin:arith-preference:test#8"], eval_steps=20, logging_steps=1, beta=0.5,
                  learning_rate=1e-2)
    trainer = result["trainer"]
    assert trainer.ref_model is None  # no second model: adapters switched off for the reference
    logs = _train_logs(result)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert all(key in h for h in logs), key
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=0.02)  # policy == reference at the start
    assert logs[-1]["loss"] < 0.3 < logs[0]["loss"]
    assert logs[-1]["rewards/margins"] > 0 and logs[-1]["rewards/accuracies"] > 0.5
    evals = [h for h in result["log_history"] if "eval_loss" in h]
    assert evals and "eval_rewards/accuracies" in evals[-1]
    ckpt = Path(result["last_checkpoint"])
    assert (ckpt / "adapter_model.safetensors").is_file()
    saved = json.loads((ckpt / "args.json").read_text())
    assert saved["rlhf_type"] == "dpo" and saved["beta"] == 0.5 and saved["loss_type"] is None


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_precomputed_reference_matches_live_reference(tmp_path, train_type):
    from lmforge.rlhf.trainer import PreferenceTrainer

    result = _run(tmp_path, max_steps=1, precompute_ref_log_probs=True, learning_rate=0.0, train_type=train_type)
    trainer: PreferenceTrainer = result["trainer"]
    assert trainer.ref_model is None  # no model kept for the reference, whatever the tuner
    ds = trainer.train_dataset
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(ds.column_names)
    batch = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(4)]))
    with trainer._reference(trainer.model) as ref:  # lr 0: the policy is still the reference
        chosen, rejected = trainer._pair_logps(ref, batch)
    assert chosen.tolist() == pytest.approx(batch["ref_chosen_logps"].tolist(), abs=1e-4)
    assert rejected.tolist() == pytest.approx(batch["ref_rejected_logps"].tolist(), abs=1e-4)
    # with the policy still equal to the reference, the loss is exactly log 2
    assert _train_logs(result)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_split_forward_and_padding_free_give_the_same_loss(tmp_path):
    result = _run(tmp_path, max_steps=1, learning_rate=0.0, rpo_alpha=1.0)
    trainer = result["trainer"]
    rows = [trainer.train_dataset[i] for i in range(4)]
    losses = []
    for concat, padding_free in ((True, False), (False, False), (True, True), (False, True)):
        trainer.rlhf.concat_forward = concat
        trainer.data_collator.base.padding_free = padding_free
        batch = trainer._prepare_inputs(trainer.data_collator(rows))
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses == pytest.approx([losses[0]] * 4, abs=1e-4)


def test_full_dpo_uses_a_frozen_copy(tmp_path):
    result = _run(tmp_path, train_type="full", max_steps=2, learning_rate=1e-3)
    trainer = result["trainer"]
    ref, policy = trainer.ref_model, trainer.model
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    assert not any(p.data_ptr() == q.data_ptr() for p, q in zip(ref.parameters(), policy.parameters()))


@pytest.mark.parametrize("rlhf_type,extra", [
    ("kto", {}),
    ("orpo", {}),
    ("simpo", {}),
    ("cpo", {"loss_type": "hinge"}),
    ("dpo", {"loss_type": "ipo", "packing": True}),
])
def test_each_objective_trains(tmp_path, rlhf_type, extra):
    result = _run(tmp_path, rlhf_type=rlhf_type, **extra)
    logs = _train_logs(result)
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    assert "rewards/chosen" in logs[0] and "rewards/rejected" in logs[0]
    if rlhf_type == "kto":
        assert "kl" in logs[0] and "rewards/margins" in logs[0]
    if rlhf_type in ("orpo", "cpo"):
        assert "nll_loss" in logs[0]


def test_reward_model(tmp_path):
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": str(i + 1)}],
             "rejected_response": str(i + 2), "margin": float(i % 3)} for i in range(16)]
    path = tmp_path / "pairs.jsonl"
    datasets.Dataset.from_list(rows).to_json(str(path))
    result = _run(tmp_path, rlhf_type="rm", dataset=[str(path)], max_steps=4, learning_rate=1e-2)
    logs = _train_logs(result)
    assert "rewards/accuracies" in logs[0] and "rewards/margins" in logs[0]
    trainer = result["trainer"]
    base = trainer.model.get_base_model()
    assert type(base).__name__.endswith("ForSequenceClassification") and base.config.num_labels == 1
    assert any("score" in n and p.requires_grad for n, p in trainer.model.named_parameters())
    cfg = json.loads((Path(result["last_checkpoint"]) / "adapter_config.json").read_text())
    assert "score" in cfg["modules_to_save"]


# ----------------------------------------------------------------------------- issue #18: losses in the trainer


def _batch_and_scores(trainer, n=4, rows=None):
    rows = rows or [trainer.train_dataset[i] for i in range(n)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    with torch.no_grad():
        scores, weighted, full = trainer._pair_scores(trainer.model, batch, whole=True)
    return batch, scores, weighted, full


def test_cpo_ipo_and_orpo_prompt_loss_in_the_trainer(tmp_path):
    """CPO-ipo feeds the loss length-averaged log-probs; ORPO's NLL covers prompt and reply unless told not to."""
    from lmforge.rlhf import losses as L

    result = _run(tmp_path / "cpo", rlhf_type="cpo", loss_type="ipo", max_steps=1, learning_rate=0.0, cpo_alpha=0.0)
    trainer = result["trainer"]
    batch, scores, _, _ = _batch_and_scores(trainer)
    avg = scores.logps(average=True)
    want = L.cpo_loss(avg[:4], avg[4:], beta=0.1, loss_type="ipo").losses.mean()
    with torch.no_grad():
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(want.item(), abs=1e-5)

    result = _run(tmp_path / "orpo", rlhf_type="orpo", max_steps=1, learning_rate=0.0)
    trainer = result["trainer"]
    batch, scores, _, full = _batch_and_scores(trainer)
    assert (full.counts[:4] > scores.counts[:4]).all()  # the prompt's tokens count too
    avg = scores.logps(average=True)
    odds = L.orpo_loss(avg[:4], avg[4:], beta=0.1).losses.mean()
    for prompt_loss, own in ((True, full), (False, scores)):
        trainer.rlhf.orpo_prompt_loss = prompt_loss
        nll = -own.sums[:4].sum() / own.counts[:4].sum()
        with torch.no_grad():
            assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx((odds + nll).item(), abs=1e-5)


def test_dpo_loss_mix_ld_alpha_and_bco(tmp_path):
    """--loss_type sigmoid sft --loss_weights 1 0.5 is DPO + 0.5 x the chosen NLL; --ld_alpha damps the longer
    reply's excess tokens in policy and reference alike; bco_pair's delta is the running mean reward."""
    from lmforge.rlhf import losses as L

    result = _run(tmp_path / "mix", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], max_steps=2,
                  learning_rate=1e-3, logging_steps=1, train_type="full")
    logs = _train_logs(result)
    assert {"loss/sigmoid", "nll_loss"} <= set(logs[0])
    assert logs[0]["loss"] == pytest.approx(logs[0]["loss/sigmoid"] + 0.5 * logs[0]["nll_loss"], abs=1e-4)

    trainer = result["trainer"]  # the same trained policy and frozen reference, other settings
    args = trainer.rlhf
    args.pref_loss_type, args.loss_weights, args.ld_alpha = ["sigmoid"], [], 0.5

    def n_labels(row, side):
        return sum(t != -100 for t in row[f"{side}_labels"])

    ds = trainer.train_dataset
    uneven = [ds[i] for i in range(len(ds)) if n_labels(ds[i], "chosen") != n_labels(ds[i], "rejected")]
    even = [ds[i] for i in range(len(ds)) if n_labels(ds[i], "chosen") == n_labels(ds[i], "rejected")]
    batch, scores, weighted, _ = _batch_and_scores(trainer, rows=uneven[:2] + even[:2])
    counts = scores.counts
    assert torch.equal(weighted.sums[:4] == scores.sums[:4], counts[:4] <= counts[4:])  # only the longer one moves
    with torch.no_grad():
        pc, pr = trainer._pair_logps(trainer.model, batch)
        rc, rr = trainer._pair_logps(trainer.ref_model, batch)
        assert pc.tolist() == pytest.approx(weighted.sums[:4].tolist(), abs=1e-5)
        want = L.dpo_loss(pc, pr, rc, rr, beta=0.1).losses.mean()
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(want.item(), abs=1e-5)

    args.pref_loss_type, args.ld_alpha = ["bco_pair"], None
    trainer.model.train()
    for _ in range(2):  # training updates the running mean over chosen and rejected rewards
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
    total, count = trainer._bco_stats.tolist()
    with torch.no_grad():
        pc, pr = trainer._pair_logps(trainer.model, batch)
        rc, rr = trainer._pair_logps(trainer.ref_model, batch)
    rewards = 0.1 * torch.cat([pc - rc, pr - rr])
    assert count == 16 and total == pytest.approx(2 * rewards.sum().item(), abs=1e-4)
    trainer.model.eval()  # evaluation reads it without adding to it
    with torch.no_grad():
        want = L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="bco_pair", bco_delta=total / count).losses.mean()
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(want.item(), abs=1e-5)
    assert trainer._bco_stats.tolist()[1] == 16


def test_sync_ref_model_with_lora(tmp_path):
    """TR-DPO on a LoRA policy: the reference is a merged frozen copy; alpha 1 every step makes it the policy."""
    from lmforge.rlhf.rollout import policy_named_weights

    result = _run(tmp_path, sync_ref_model=True, ref_model_mixup_alpha=1.0, ref_model_sync_steps=1, max_steps=2,
                  learning_rate=1e-2)
    trainer = result["trainer"]
    ref = dict(trainer.ref_model.named_parameters())
    merged = dict(policy_named_weights(trainer.model))
    assert set(merged) == set(ref)
    assert all(torch.allclose(ref[n], merged[n]) for n in merged)
    with pytest.raises(ArgumentError, match="sync_ref_model"):
        RlhfArguments(rlhf_type="kto", sync_ref_model=True)
