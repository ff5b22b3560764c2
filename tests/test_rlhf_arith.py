"""SFT then DPO on the arithmetic task, on CPU: does DPO teach the preference without hurting accuracy?

1. SFT (full) on ``builtin:arith``: as a test, the session's shared warm start (conftest
   ``arith_warm_ckpt``, held-out exact match just past 40%); as a script, 800 steps at lr 2e-3 (the
   README table's start: ~15% right, the right answer preferred on ~80% of the pairs).
2. DPO (LoRA; the reference is the SFT model itself, adapters off) on ``builtin:arith-preference``,
   with the RPO term (``rpo_alpha 1``: NLL of the chosen reply).
3. Before and after DPO, on held-out questions never trained on:
   - exact match of greedy answers on ``builtin:arith:test``;
   - on ``builtin:arith-preference:test`` pairs: how often the model gives the right answer a higher
     log-prob than the near miss (``pref_acc``), the implicit DPO reward accuracy and margin
     ``beta [(pi_c - ref_c) - (pi_r - ref_r)]`` (zero before DPO, where policy = reference).

Why the RPO term: plain DPO on these off-policy near misses raises the reward margin by pushing
the rejected replies down *and* the chosen ones with them (likelihood displacement), and greedy
exact match falls (``--rpo_alpha 0`` shows it); Pang et al. 2024 add the NLL term for the same
reason on maths. ``--control`` also runs LoRA SFT with the same budget; ``--on_policy`` builds the
pairs from the SFT model's own wrong answers (``pairs_from_samples``) instead.

Run as a test (``pytest -m slow tests/test_rlhf_arith.py -s``, ~2.5 min on two idle cores) or as a
script: ``python tests/test_rlhf_arith.py [--rpo_alpha 0] [--control] [--on_policy]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

N_EVAL = 400  # held-out questions / pairs scored before and after


def greedy_exact_match(model: Any, tokenizer: Any, template: Any, rows: list[dict], batch_size: int = 200) -> float:
    """Fraction of ``rows`` (arith rows with ``solution``) whose greedy answer is exactly right."""
    from lmforge.dataset import arith_answer_correct

    answers = greedy_answers(model, tokenizer, template, rows, batch_size)
    return sum(arith_answer_correct(a, r["solution"]) for a, r in zip(answers, rows)) / len(rows)


def greedy_answers(model: Any, tokenizer: Any, template: Any, rows: list[dict], batch_size: int = 200) -> list[str]:
    """The model's greedy reply to each row's question (left-padded batches, plain ``generate``)."""
    import torch

    template.set_mode("infer")
    model.eval()
    pad = tokenizer.pad_token_id
    answers = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        prompts = [template.encode({"messages": r["messages"][:-1]})["input_ids"] for r in chunk]
        n = max(map(len, prompts))
        ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 eos_token_id=template.stop_token_ids, pad_token_id=pad)
        answers += [template.decode(gen) for gen in out[:, n:]]
    return answers


def pair_log_probs(model: Any, template: Any, rows: list[dict], batch_size: int = 100) -> tuple[list, list]:
    """Summed log-probs of the chosen and rejected replies of preference ``rows``."""
    import torch

    from lmforge.rlhf.collator import PreferenceCollator
    from lmforge.rlhf.trainer import _model_inputs, sequence_log_probs

    template.set_mode("rlhf")
    collate = PreferenceCollator(template.tokenizer.pad_token_id)
    model.eval()
    chosen, rejected = [], []
    for s in range(0, len(rows), batch_size):
        batch = collate([template.encode(r) for r in rows[s:s + batch_size]])
        with torch.no_grad():
            logits = model(**_model_inputs(batch), use_cache=False).logits
        sums = sequence_log_probs(logits, batch["labels"]).sums
        k = sums.shape[0] // 2
        chosen += sums[:k].tolist()
        rejected += sums[k:].tolist()
    return chosen, rejected


def preference_report(pc: list, pr: list, rc: list, rr: list, beta: float) -> dict[str, float]:
    n = len(pc)
    margins = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc, pr, rc, rr)]
    return {"pref_acc": sum(a > b for a, b in zip(pc, pr)) / n,
            "reward_acc": sum(m > 0 for m in margins) / n,
            "reward_margin": sum(margins) / n}


def run_experiment(workdir: str | Path, sft_steps: int = 800, dpo_steps: int = 300, dpo_lr: float = 2e-3,
                   beta: float = 0.5, rpo_alpha: float | None = 1.0, dpo_rows: int = 9600,
                   sft_ckpt: str | None = None, train_type: str = "lora", loss_type: str = "sigmoid",
                   control: bool = False, on_policy: bool = False) -> dict[str, Any]:
    from lmforge import RlhfArguments, TrainArguments, rlhf_main, sft_main
    from lmforge.dataset import load_dataset
    from lmforge.model import get_model_tokenizer
    from lmforge.template import get_template

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from arith_probe import SEED

    common = dict(add_version=False, report_to=["none"], plot=False, logging_steps=25, gradient_accumulation_steps=1,
                  seed=SEED, data_seed=SEED)
    t0 = time.time()
    if sft_ckpt is None:
        sft = sft_main(TrainArguments(model="builtin:tiny", dataset=["builtin:arith"], train_type="full",
                                      learning_rate=2e-3, per_device_train_batch_size=64, max_steps=sft_steps,
                                      save_steps=sft_steps, output_dir=str(workdir / "sft"), **common))
        sft_ckpt = sft["last_checkpoint"]
    t_sft = time.time() - t0

    test_q, _ = load_dataset([f"builtin:arith:test#{N_EVAL}"])
    test_p, _ = load_dataset([f"builtin:arith-preference:test#{N_EVAL}"])
    test_q, test_p = list(test_q), list(test_p)
    model, tok = get_model_tokenizer(sft_ckpt, device="cpu")
    template = get_template(tok)
    em_before = greedy_exact_match(model, tok, template, test_q)
    ref_c, ref_r = pair_log_probs(model, template, test_p)
    before = {"exact_match": em_before, **preference_report(ref_c, ref_r, ref_c, ref_r, beta)}
    dpo_data = f"builtin:arith-preference#{dpo_rows}"
    if on_policy:  # the SFT model's own wrong greedy answers as the rejected replies
        from lmforge.rlhf.data import pairs_from_samples

        questions, _ = load_dataset([f"builtin:arith#{dpo_rows}"], seed=1)
        questions = list(questions)
        pairs = pairs_from_samples(questions, [[a] for a in greedy_answers(model, tok, template, questions)])
        dpo_data = str(workdir / "on_policy_pairs.jsonl")
        Path(dpo_data).write_text("".join(json.dumps(p) + "\n" for p in pairs))
    del model

    t1 = time.time()
    dpo = rlhf_main(RlhfArguments(model=sft_ckpt, rlhf_type="dpo", dataset=[dpo_data],
                                  train_type=train_type, lora_rank=16, learning_rate=dpo_lr, beta=beta,
                                  rpo_alpha=rpo_alpha or None, loss_type=loss_type, per_device_train_batch_size=32,
                                  max_steps=dpo_steps,
                                  save_steps=dpo_steps, output_dir=str(workdir / "dpo"), **common))
    t_dpo = time.time() - t1
    policy = dpo["trainer"].model
    em_after = greedy_exact_match(policy, tok, template, test_q)
    pc, pr = pair_log_probs(policy, template, test_p)
    after = {"exact_match": em_after, **preference_report(pc, pr, ref_c, ref_r, beta)}
    train_logs = [h for h in dpo["log_history"] if "loss" in h]
    if control:  # the same LoRA budget spent on plain SFT of the chosen answers: what the NLL term alone gives
        ctl = sft_main(TrainArguments(model=sft_ckpt, dataset=[f"builtin:arith-preference#{dpo_rows}"],
                                      train_type=train_type, lora_rank=16, learning_rate=dpo_lr,
                                      per_device_train_batch_size=32, max_steps=dpo_steps, save_steps=dpo_steps,
                                      output_dir=str(workdir / "control_sft"), **common))
        cc, cr = pair_log_probs(ctl["trainer"].model, template, test_p)
        control_report = {"exact_match": greedy_exact_match(ctl["trainer"].model, tok, template, test_q),
                          **preference_report(cc, cr, ref_c, ref_r, beta)}
    report = {"sft_checkpoint": sft_ckpt, "train_type": train_type, "loss_type": loss_type, "sft_steps": sft_steps,
              "dpo_steps": dpo_steps, "dpo_lr": dpo_lr, "beta": beta, "rpo_alpha": rpo_alpha,
              "n_eval": N_EVAL, "before": before, "after": after,
              **({"control_lora_sft": control_report} if control else {}),
              **({"on_policy_pairs": len(pairs)} if on_policy else {}),
              "dpo_train_first": {k: train_logs[0].get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")},
              "dpo_train_last": {k: train_logs[-1].get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")},
              "seconds": {"sft": round(t_sft, 1), "dpo": round(t_dpo, 1)}}
    return report


@pytest.mark.slow
@pytest.mark.xdist_group("arith")
def test_sft_then_dpo_on_arith(tmp_path, arith_warm_ckpt):
    report = run_experiment(tmp_path, sft_ckpt=arith_warm_ckpt)
    print(json.dumps(report, indent=2))
    before, after = report["before"], report["after"]
    assert after["reward_acc"] > 0.65 and after["reward_margin"] > 0.3  # both exactly 0 before DPO
    assert after["pref_acc"] > before["pref_acc"]
    assert after["exact_match"] >= before["exact_match"]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/lmforge-arith-dpo")
    p.add_argument("--sft_steps", type=int, default=800)
    p.add_argument("--dpo_steps", type=int, default=300)
    p.add_argument("--dpo_lr", type=float, default=2e-3)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--rpo_alpha", type=float, default=1.0, help="0: plain DPO")
    p.add_argument("--dpo_rows", type=int, default=9600)
    p.add_argument("--sft_ckpt", default=None, help="start DPO from this SFT checkpoint instead of training one")
    p.add_argument("--train_type", default="lora")
    p.add_argument("--loss_type", default="sigmoid")
    p.add_argument("--control", action="store_true", help="also run LoRA SFT with the same budget, for comparison")
    p.add_argument("--on_policy", action="store_true", help="DPO on the SFT model's own wrong answers instead")
    a = p.parse_args()
    print(json.dumps(run_experiment(a.workdir, a.sft_steps, a.dpo_steps, a.dpo_lr, a.beta, a.rpo_alpha, a.dpo_rows,
                                    a.sft_ckpt, a.train_type, a.loss_type, a.control, a.on_policy), indent=2))
    sys.exit(0)
