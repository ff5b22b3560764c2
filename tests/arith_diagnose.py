"""What a GRPO warm start on ``builtin:arith`` has left to gain: a diagnosis of an SFT checkpoint, not a test.

GRPO at the slow tests' budget (60 steps of 16 prompts x 8 samples, lr 1e-4) mostly *sharpens*: it turns
answers the model already gives with fair probability into its greedy answer, and teaches little that it
does not yet half-know (issue #15, seed 1: RESULTS.md). So whether a start lifts by 10 points depends on
where its errors are, which this script shows:

- greedy exact match on the tests' 200 held-out questions, by kind (operator, carry/borrow in the ones
  column, digits of the answer) and by error (the ones digit wrong, off by one, ...);
- near misses: held-out questions answered wrong whose right answer still has probability >= 0.1 / 0.2 / 0.3
  (teacher-forced, answer and end token) - what sharpening can reach;
- on training prompts, 8 samples each at temperature 1: the sampled accuracy, pass@8 and the share of groups
  whose rewards are all equal (no GRPO signal), by kind.

    python tests/arith_diagnose.py CKPT [CKPT ...] [--prompts 256]
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


def kind(question: str) -> tuple[str, bool, int]:
    """(operator, carry or borrow in the ones column, digits of the answer) of 'What is a op b?'."""
    a, op, b = re.match(r"What is (\d+) ([-+*]) (\d+)\?", question).groups()
    a, b = int(a), int(b)
    if op == "+":
        return op, a % 10 + b % 10 >= 10, len(str(a + b))
    if op == "-":
        return op, a % 10 < b % 10, len(str(a - b))
    return op, False, len(str(a * b))


def error_kind(reply: str, solution: str) -> str:
    if reply == solution:
        return "right"
    if not reply.isdigit():
        return "not a number"
    if len(reply) != len(solution):
        return "wrong length"
    if abs(int(reply) - int(solution)) == 1:
        return "off by one"
    if abs(int(reply) - int(solution)) == 10:
        return "off by ten"
    if reply[:-1] == solution[:-1]:
        return "ones digit wrong"
    return "other"


def _rate(counts: dict[Any, list[int]]) -> dict[str, str]:
    return {" ".join(map(str, k)) if isinstance(k, tuple) else str(k): f"{a}/{n} = {a / n:.2f}"
            for k, (a, n) in sorted(counts.items(), key=lambda kv: str(kv[0]))}


def answer_logprob(model: Any, template: Any, question: dict, solution: str) -> float:
    """log p(``solution`` and the end of the turn | question), teacher-forced."""
    import torch

    enc = template.encode({"messages": [question, {"role": "assistant", "content": solution}]})
    ids, labels = enc["input_ids"], enc["labels"]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)) if labels[i] != -100)


def diagnose(ckpt: str, n_prompts: int = 256, n_samples: int = 8, seed: int = 0) -> dict[str, Any]:
    import torch
    from arith_probe import held_out_rows

    from lmforge.dataset import load_dataset
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine
    from lmforge.model import get_model_tokenizer
    from lmforge.template import get_template

    model, tok = get_model_tokenizer(ckpt, device="cpu")
    model.eval()
    template = get_template(tok)
    engine = HfEngine(model_obj=model, tokenizer=tok, template=template, max_batch_size=256)

    def replies(rows: list[dict], n: int, temperature: float) -> list[str]:
        reqs = [InferRequest(messages=r["messages"][:1]) for r in rows]
        outs = engine.infer(reqs, RequestConfig(max_tokens=8, temperature=temperature, n=n), use_tqdm=False)
        return [c.message.content.strip() for o in outs for c in o.choices]

    test = held_out_rows(slice(0, 200))  # the rows tests/test_grpo_arith.py scores
    torch.manual_seed(seed)
    greedy = replies(test, 1, 0.0)
    by_kind: dict[Any, list[int]] = collections.defaultdict(lambda: [0, 0])
    errors: collections.Counter = collections.Counter()
    near = [0, 0, 0]
    for r, g in zip(test, greedy):
        ok = g == r["solution"]
        k = kind(r["messages"][0]["content"])
        for key in (k, ("op", k[0]), ("digits", k[2])):
            by_kind[key][0] += ok
            by_kind[key][1] += 1
        errors[error_kind(g, r["solution"])] += 1
        if not ok:
            p = math.exp(answer_logprob(model, template, r["messages"][0], r["solution"]))
            for i, t in enumerate((0.1, 0.2, 0.3)):
                near[i] += p >= t

    train = list(load_dataset(["builtin:arith-rl#4000"], shuffle=False)[0])[:n_prompts]
    sampled = replies(train, n_samples, 1.0)
    groups: dict[Any, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0])  # right, samples, pass, flat
    hist: collections.Counter = collections.Counter()
    for i, r in enumerate(train):
        right = sum(s == r["solution"] for s in sampled[i * n_samples:(i + 1) * n_samples])
        hist[right] += 1
        for key in (kind(r["messages"][0]["content"]), "all"):
            g = groups[key]
            g[0] += right
            g[1] += n_samples
            g[2] += right > 0
            g[3] += right in (0, n_samples)
    prompts = {" ".join(map(str, k)) if isinstance(k, tuple) else k:
               {"n": g[1] // n_samples, "sampled_acc": round(g[0] / g[1], 3), "pass@8": round(g[2] * n_samples / g[1], 3),
                "all_equal": round(g[3] * n_samples / g[1], 3)} for k, g in groups.items()}
    return {"checkpoint": ckpt, "greedy_exact_match": sum(g == r["solution"] for r, g in zip(test, greedy)) / len(test),
            "greedy_by_kind": _rate(by_kind), "greedy_errors": dict(errors),
            "near_misses_p>=0.1/0.2/0.3": [n / len(test) for n in near],
            "train_prompts_T1": prompts, "right_per_group": dict(sorted(hist.items()))}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--prompts", type=int, default=256, help="training prompts to sample")
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)
    for c in a.checkpoints:
        print(json.dumps(diagnose(c, a.prompts), indent=1), flush=True)
