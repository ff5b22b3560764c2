"""``lmforge sample``: N samples per prompt, scored by reward functions (ORM) and a PRM, kept as training data.

    lmforge sample --model out/sft/checkpoint-1000 --dataset builtin:arith-rl#2000 \\
        --num_return_sequences 8 --reward_funcs accuracy --min_score 1 --result_path best.jsonl
    lmforge rlhf --rlhf_type dpo ... --dataset pairs.jsonl   # after --sample_format dpo
    lmforge sft ... --dataset best.jsonl                     # rejection-sampling fine-tuning

A sample's score is the weighted sum of its rewards (``--reward_funcs``, ``--reward_model``,
``--reward_weights``; a reward that does not apply counts 0) plus ``--prm_weight`` x the PRM's
step scores reduced by ``--prm_aggregate``. Output (one JSON line per prompt), by ``--sample_format``:

- ``sft``: ``{"messages": prompt + best reply, "score", ...the row's other columns}``;
- ``dpo``: ``{"messages": prompt + best reply, "rejected_response": worst reply, "score", "rejected_score"}``
  (prompts whose best and worst tie are skipped);
- ``all``: ``{"messages": prompt, "samples": [{"response", "score", "rewards", "prm"}, ...]}``.

With ``--min_score`` a prompt is kept only if its best sample scores at least that much (rejection
sampling: ``--reward_funcs accuracy --min_score 1`` keeps right answers only). Rows are read as
``lmforge infer`` reads them (a trailing assistant reply is the reference, not part of the prompt).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from lmforge.arguments import SampleArguments
from lmforge.utils.log import setup_logging

logger = logging.getLogger("lmforge")


def _score(args: SampleArguments, reward_funcs: list, prm: Any, completions: list[str],
           columns: dict[str, list[Any]]) -> tuple[list[float], Any, list[list[float | None]] | None]:
    """(total score per sample, reward table [N, F], PRM step scores or None)."""
    from lmforge.rlhf.prm import aggregate_steps
    from lmforge.rlhf.rewards import score_completions, weighted_rewards

    table = score_completions(reward_funcs, completions, columns) if reward_funcs else None
    total = weighted_rewards(table, args.reward_weights).tolist() if table is not None else [0.0] * len(completions)
    steps = None
    if prm is not None:
        steps = [list(s) for s in prm(completions, **columns)]
        if len(steps) != len(completions):
            raise ValueError(f"--prm {args.prm}: returned step scores for {len(steps)} of {len(completions)} replies")
        total = [t + args.prm_weight * (aggregate_steps(s, args.prm_aggregate) or 0.0) for t, s in zip(total, steps)]
    return total, table, steps


def _output_rows(args: SampleArguments, out: dict[str, Any], replies: list[str], scores: list[float],
                 table: Any, steps: Any, names: list[str]) -> dict[str, Any] | None:
    """The line written for one prompt (None: skipped by --min_score or a tie)."""
    from lmforge.rlhf.data import pairs_from_samples

    prompt = out["messages"]
    extra = {k: v for k, v in out.items() if k not in ("messages", "response", "reference")}
    if args.sample_format == "all":
        samples = [{"response": r, "score": s,
                    "rewards": {n: (None if v != v else v) for n, v in zip(names, table[k].tolist())}
                    if table is not None else {},
                    **({"prm": steps[k]} if steps is not None else {})} for k, (r, s) in enumerate(zip(replies, scores))]
        return {"messages": prompt, "samples": samples, **extra}
    best = max(range(len(replies)), key=lambda k: scores[k])
    if args.min_score is not None and scores[best] < args.min_score:
        return None
    if args.sample_format == "sft":
        return {"messages": [*prompt, {"role": "assistant", "content": replies[best]}], "score": scores[best], **extra}
    pairs = pairs_from_samples([{**extra, "messages": prompt}], [replies], scores=[scores], min_score=args.min_score)
    if not pairs:
        return None
    worst = min(range(len(replies)), key=lambda k: scores[k])
    return {**pairs[0], "score": scores[best], "rejected_score": scores[worst]}


def sample_main(args: SampleArguments) -> dict[str, Any]:
    """Sample, score, keep; returns a summary (``result_path``, ``prompts``, ``written``, ``skipped``, ...)."""
    setup_logging()
    import torch
    from tqdm.auto import tqdm

    from lmforge.infer.errors import InferRequestError
    from lmforge.pipelines.infer import (_default_result_path, build_engine, iter_rows, request_config_from_args,
                                         row_to_request)
    from lmforge.registry import load_plugins
    from lmforge.rlhf.prm import build_prm
    from lmforge.rlhf.rewards import build_reward_funcs
    from lmforge.rlhf.rollout import _infer_tolerant

    load_plugins(args.external_plugins)
    if not (args.dataset or args.val_dataset):
        raise ValueError("no prompts: pass --dataset (a file, a hub id, or builtin:arith-rl)")
    torch.manual_seed(args.seed)
    reward_funcs = build_reward_funcs(args.reward_funcs, reward_kwargs=args.reward_kwargs,
                                      reward_models=args.reward_model, max_completion_length=args.max_new_tokens)
    prm = build_prm(args.prm, args.prm_kwargs) if args.prm else None
    names = [n for n, _ in reward_funcs]
    # every row is read and checked before the model loads: a bad one fails at once (or is skipped with --strict false)
    items, bad = [], 0
    for where, row, error in iter_rows(args):
        try:
            if error:
                raise InferRequestError(error)
            items.append(row_to_request(row))
        except (InferRequestError, ValueError) as e:
            if args.strict:
                raise ValueError(f"{where}: {getattr(e, 'reason', e)} (pass --strict false to skip such rows)") from None
            bad += 1
            logger.warning("%s: skipped: %s", where, getattr(e, "reason", e))
    if not items:
        raise ValueError("the dataset has no prompts to sample")
    engine = build_engine(args)
    config = request_config_from_args(args).model_copy(update={"n": args.num_return_sequences})
    path = Path(args.result_path) if args.result_path else _default_result_path(args, engine, "sample")
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = {"written": 0, "skipped": 0, "failed": bad, "samples": 0, "best_score_sum": 0.0}
    start = time.perf_counter()
    logger.info("Sampling %d x %d replies into %s (rewards %s%s)", len(items), args.num_return_sequences, path,
                names or "none", f", PRM {args.prm}" if args.prm else "")
    from lmforge.utils.gc_heap import frozen_heap

    with open(path, "w", encoding="utf-8") as f, frozen_heap(), \
            tqdm(total=len(items), desc="Sampling", unit="prompt", dynamic_ncols=True) as bar:
        for lo in range(0, len(items), args.sample_batch_size):
            chunk = items[lo:lo + args.sample_batch_size]
            responses = _infer_tolerant(engine, [req for req, _ in chunk], config)
            kept = [(out, resp) for (_, out), resp in zip(chunk, responses) if resp is not None]
            stats["failed"] += len(chunk) - len(kept)
            if kept:
                replies = [[c.message.content or "" for c in resp.choices] for _, resp in kept]
                flat = [r for rs in replies for r in rs]
                n = args.num_return_sequences
                columns = {k: [out.get(k) for out, _ in kept for _ in range(n)]
                           for k in kept[0][0] if k not in ("messages", "response", "reference")}
                columns.update(prompts=[out["messages"] for out, _ in kept for _ in range(n)],
                               messages=[[*out["messages"], {"role": "assistant", "content": r}]
                                         for (out, _), rs in zip(kept, replies) for r in rs],
                               completion_lengths=[len(c.token_ids or ()) for _, resp in kept for c in resp.choices])
                scores, table, steps = _score(args, reward_funcs, prm, flat, columns)
                for k, ((out, _), rs) in enumerate(zip(kept, replies)):
                    sl = slice(k * n, (k + 1) * n)
                    line = _output_rows(args, out, rs, scores[sl], table[sl] if table is not None else None,
                                        steps[sl] if steps is not None else None, names)
                    stats["samples"] += n
                    stats["best_score_sum"] += max(scores[sl])
                    if line is None:
                        stats["skipped"] += 1
                    else:
                        f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
                        stats["written"] += 1
                f.flush()
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    scored = len(items) - stats["failed"] + bad
    summary = {"result_path": str(path), "prompts": len(items) + bad, "written": stats["written"],
               "skipped": stats["skipped"], "failed": stats["failed"], "samples": stats["samples"],
               "mean_best_score": round(stats["best_score_sum"] / scored, 6) if scored else None,
               "seconds": round(seconds, 3)}
    print(f"sample: {summary['prompts']} prompts x {args.num_return_sequences}: {summary['written']} written, "
          f"{summary['skipped']} below --min_score or tied, {summary['failed']} failed; mean best score "
          f"{summary['mean_best_score']} in {seconds:.1f} s -> {path}")
    return summary
