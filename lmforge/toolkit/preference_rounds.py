"""``lmforge preference train``: one round of learning from recorded feedback, evaluated against the last round.

A round reads the feedback file (``lmforge.agents.preference``), keeps the held-out records aside, writes
the rest as rows for ``rlhf --rlhf_type dpo|kto`` into ``<rounds_dir>/round-N/train.jsonl`` and trains from
the current model (the base at first, then the last accepted round; LoRA rounds are merged so the next
round starts from full weights). Then both the new model and the current one are scored on the held-out
records:

- ``pair_accuracy``: the share of held-out preference pairs (choices, and an up and a down rating of the
  same conversation) whose chosen answer the model gives more log-probability than the rejected one;
- with ``--judge NAME`` (a reward in ``REWARDS``: built-in, or a plugin's), ``judged_rate``: the mean score
  the judge gives to answers each model samples for the held-out conversations -- the rate at which the
  model now answers the way the feedback asked for.

The round is accepted (its model becomes the current one) when it is not worse on the judged rate, or on
pair accuracy without a judge; ``state.json`` records every round and the current model.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("lmforge")


def sequence_log_prob(model: Any, template: Any, messages: list[dict[str, str]]) -> float:
    """Summed log-probability of the last (assistant) message's labelled tokens."""
    import torch

    from lmforge.rlhf.scoring import sequence_log_probs

    enc = template.encode({"messages": messages})
    ids = torch.tensor([enc["input_ids"]], device=next(model.parameters()).device)
    with torch.no_grad():
        return float(sequence_log_probs(model(input_ids=ids).logits, torch.tensor([enc["labels"]], device=ids.device)).sums[0])


def pair_accuracy(model_dir: str, pairs: list[dict[str, Any]]) -> float | None:
    from lmforge.model import get_model_tokenizer
    from lmforge.template import get_template

    if not pairs:
        return None
    model, tok = get_model_tokenizer(model_dir, device="cpu" if not _cuda() else "cuda")
    model.eval()
    template = get_template(tok)
    right = 0
    for row in pairs:
        chosen = row["messages"]
        rejected = [*chosen[:-1], {"role": "assistant", "content": row["rejected_response"]}]
        right += sequence_log_prob(model, template, chosen) > sequence_log_prob(model, template, rejected)
    del model
    return right / len(pairs)


def judged_rate(model_dir: str, prompts: list[list[dict[str, str]]], judge: str, samples: int, max_tokens: int,
                seed: int) -> float | None:
    """Mean judge score of ``samples`` answers per held-out conversation, sampled at temperature 1."""
    from lmforge.infer import InferRequest, RequestConfig, get_engine
    from lmforge.registry import REWARDS

    if not prompts:
        return None
    fn = REWARDS.get(judge)
    fn = fn() if isinstance(fn, type) else fn
    engine = get_engine("hf", model=model_dir, device="cuda" if _cuda() else "cpu")
    cfg = RequestConfig(n=samples, temperature=1.0, max_tokens=max_tokens, seed=seed)
    out = engine.infer([InferRequest(messages=p) for p in prompts], cfg, use_tqdm=False)
    completions = [c.message.content or "" for r in out for c in r.choices]
    scores = fn(completions, prompts=[p for p in prompts for _ in range(samples)])
    vals = [float(s) for s in scores if s is not None]
    return sum(vals) / len(vals) if vals else None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _state(rounds_dir: Path, model: str) -> dict[str, Any]:
    p = rounds_dir / "state.json"
    if p.is_file():
        return json.loads(p.read_text(encoding="utf-8"))
    return {"base_model": model, "current_model": model, "rounds": []}


def run_round(args: Any) -> dict[str, Any]:
    """One round (see the module docstring); returns its report."""
    from lmforge.agents.preference import FeedbackStore, held_out, preference_rows
    from lmforge.arguments import RlhfArguments, to_dict
    from lmforge.pipelines.rlhf import rlhf_main
    from lmforge.registry import REWARDS, load_plugins
    from lmforge.utils.io import atomic_write_text

    load_plugins(args.external_plugins)
    if args.judge and args.judge not in REWARDS:
        raise ValueError(f"--judge: {REWARDS.unknown_message(args.judge)}")
    rounds_dir = Path(args.rounds_dir)
    state = _state(rounds_dir, args.model)
    records = list(FeedbackStore(args.feedback_file).records())
    train = [r for r in records if not held_out(r, args.holdout)]
    evals = [r for r in records if held_out(r, args.holdout)]
    rows = preference_rows(train, args.rlhf_type)
    if len(rows) < args.min_rows:
        raise ValueError(f"--feedback_file {args.feedback_file}: {len(rows)} {args.rlhf_type} rows from {len(train)} "
                         f"records; a round needs at least --min_rows {args.min_rows}")
    n = len(state["rounds"]) + 1
    out = rounds_dir / f"round-{n}"
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train.jsonl"
    atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    current = state["current_model"]
    fields = {k: v for k, v in to_dict(args).items() if k in RlhfArguments.__dataclass_fields__}
    fields.update(model=current, dataset=[str(data)], output_dir=str(out / "train"), add_version=False)
    result = rlhf_main(RlhfArguments(**fields))
    new_model = result["last_checkpoint"]
    if args.train_type in ("lora", "dora", "qlora"):
        from lmforge.export.merge import merge_lora

        new_model = str(merge_lora(ckpt_dir=new_model, output_dir=str(out / "merged")))
    pairs = preference_rows(evals, "dpo")
    prompts = [r["messages"] for r in evals]
    report: dict[str, Any] = {"round": n, "rlhf_type": args.rlhf_type, "train_rows": len(rows),
                              "held_out_records": len(evals), "held_out_pairs": len(pairs),
                              "from_model": current, "model": new_model}
    for who, path in (("last", current), ("new", new_model)):
        report[f"pair_accuracy_{who}"] = pair_accuracy(path, pairs)
        if args.judge:
            report[f"judged_rate_{who}"] = judged_rate(path, prompts, args.judge, args.judge_samples,
                                                       args.judge_max_tokens, args.seed)
    key = "judged_rate" if args.judge and report["judged_rate_new"] is not None else "pair_accuracy"
    new, last = report.get(f"{key}_new"), report.get(f"{key}_last")
    report["accepted"] = new is None or last is None or new >= last
    report["compared_on"] = key
    if report["accepted"]:
        state["current_model"] = new_model
    state["rounds"].append(report)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(rounds_dir / "state.json", json.dumps(state, indent=2))
    verdict = "accepted" if report["accepted"] else "rejected (the last model stays current)"
    logger.info("preference round %d: %s %s -> %s; %s", n, key, last, new, verdict)
    from lmforge.utils.command import print_output

    print_output("preference train", f"round {n} {verdict}, current model {state['current_model']}", out)
    return report
