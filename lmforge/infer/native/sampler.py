"""Next-token choice on the device for a whole batch, each row with its own settings.

Greedy rows take the argmax. Sampled rows go through penalties, temperature, top-k, top-p and
min-p as tensors over the batch, then an exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``
is a draw from ``p``): one kernel for all unseeded rows, and for a row with a seed its own
``torch.Generator``, so a seeded request gives the same tokens whatever else is in the batch.
The costly steps (sorting for top-p, penalties) run only when a row asks for them.
"""
from __future__ import annotations

from typing import Sequence as Seq

import torch

from lmforge.infer.native import sample_kernel
from lmforge.infer.native.runner import upload  # no wait for queued kernels (async scheduling)
from lmforge.infer.native.scheduler import Sequence


def _column(values: list, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return upload(values, device, dtype)[:, None]


def apply_penalties(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """Repetition penalty over prompt and output (as transformers applies it); presence and frequency
    penalties over the output only (as OpenAI defines them)."""
    rows = [i for i, s in enumerate(seqs) if s.params.penalised]
    device = logits.device
    for i in rows:  # rows with penalties are rare; a loop keeps the ragged token lists simple
        p = seqs[i].params
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = upload(sorted(set(seqs[i].token_ids)), device, torch.int64)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seqs[i].num_output:
            out = upload(seqs[i].output_ids, device, torch.int64)
            counts = torch.zeros_like(row).scatter_add_(0, out, torch.ones_like(out, dtype=row.dtype))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def sample(logits: torch.Tensor, seqs: Seq[Sequence], banned: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Tokens for each row of ``logits`` [B, V] (the model's dtype), plus (chosen logprob, top ids, top
    logprobs) when any row asked for logprobs. The log-probabilities are those of the model's raw distribution.

    ``banned`` ids are never chosen (a vision-language model's image placeholders, as the hf engine does).
    An all-greedy batch takes one ``argmax``; greedy and plain-temperature rows one kernel that reads the
    logits once (:mod:`~lmforge.infer.native.sample_kernel`); anything else the float32 torch path below."""
    params = [s.params for s in seqs]
    if banned is None and all(p.greedy and not p.penalised and p.logprobs < 0 for p in params):
        return logits.argmax(-1), None, None, None  # model dtype: the same ids as float32 (exact upcast)
    if banned is None and sample_kernel.fast_rows(params) and sample_kernel.available(logits):
        inv_t = upload([1.0 / p.temperature if p.temperature > 0 else 0.0 for p in params], logits.device,
                       torch.float32)
        return sample_kernel.gumbel_argmax(logits, inv_t), None, None, None
    logits = logits.float()
    want_lp = max(p.logprobs for p in params)
    raw_lp = logits.log_softmax(-1) if want_lp >= 0 else None
    if banned is not None:
        logits = logits.index_fill(1, banned, float("-inf"))
    if any(p.penalised for p in params):
        logits = apply_penalties(logits.clone(), seqs)
    greedy = [p.greedy for p in params]
    if all(greedy):
        tokens = logits.argmax(-1)
    else:
        tokens = _sample_rows(logits, params, greedy)
    if raw_lp is None:
        return tokens, None, None, None
    chosen = raw_lp.gather(1, tokens[:, None]).squeeze(1)
    if want_lp > 0:
        top = raw_lp.topk(want_lp, dim=-1)
        return tokens, chosen, top.indices, top.values
    return tokens, chosen, None, None


def _sample_rows(logits: torch.Tensor, params: list, greedy: list[bool]) -> torch.Tensor:
    device = logits.device
    temps = _column([p.temperature if p.temperature > 0 else 1.0 for p in params], device)
    scores = logits / temps
    top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
    if any(top_k):
        k_max = min(max(top_k), scores.shape[-1])
        kth = scores.topk(k_max, dim=-1).values  # [B, k_max], descending
        idx = _column([(k if k else k_max) - 1 for k in top_k], device, torch.int64)
        limit = kth.gather(1, idx)
        limit = torch.where(_column(top_k, device, torch.int64) > 0, limit, torch.full_like(limit, -float("inf")))
        scores = scores.masked_fill(scores < limit, -float("inf"))
    probs = scores.softmax(-1)
    if any(p.top_p < 1.0 for p in params):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        drop_sorted = before > _column([p.top_p for p in params], device)
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if any(p.min_p > 0 for p in params):
        floor = probs.max(-1, keepdim=True).values * _column([p.min_p for p in params], device)
        probs = probs.masked_fill(probs < floor, 0.0)
    noise = torch.empty_like(probs).exponential_()
    for i, p in enumerate(params):
        if p.generator is not None and not greedy[i]:
            noise[i] = torch.empty(probs.shape[-1], device=device).exponential_(generator=p.generator)
    tokens = (probs / noise).argmax(-1)
    if any(greedy):
        tokens = torch.where(upload(greedy, device, torch.bool), logits.argmax(-1), tokens)
    return tokens
