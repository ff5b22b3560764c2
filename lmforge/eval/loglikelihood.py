"""Log-likelihood of continuations under a local model (multiple choice without generating).

The prompt is encoded exactly as for generation (the chat template with the generation prompt);
each continuation is tokenized on its own and appended, and the model's log-probabilities of its
tokens are summed. All continuations of one prompt go through the model in one padded batch.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any


def continuation_logprobs(engine: Any, request: Any, continuations: list[str], *, adapter: str | None = None
                          ) -> list[float]:
    """Summed log-probability of each continuation after ``request``'s prompt, under ``engine.model``."""
    import torch

    if not hasattr(engine, "model"):
        raise ValueError(f"log-likelihood scoring needs the model in this process; the {type(engine).__name__} "
                         "engine has none (drop --data_parallel_size, or score by generating)")
    prompt = list(engine.encode(request))
    tok = engine.tokenizer
    conts = [list(tok(text, add_special_tokens=False)["input_ids"]) for text in continuations]
    if any(not c for c in conts):
        raise ValueError("a choice is empty after tokenization")
    seqs = [prompt + c for c in conts]
    longest = max(len(s) for s in seqs)
    limit = getattr(engine, "max_model_len", None)
    if limit and longest > limit:
        raise ValueError(f"prompt + choice is {longest} tokens, more than max_model_len {limit}")
    pad = getattr(engine, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: positions of real tokens are 0..n-1 as in generation
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    device = getattr(engine, "device", None) or next(engine.model.parameters()).device
    use_adapter = getattr(engine, "_adapter", None)  # the hf engine's adapter switch, when adapters are served
    ctx = use_adapter(adapter) if callable(use_adapter) else nullcontext()
    lock = getattr(engine, "_lock", None) or nullcontext()
    with lock, ctx, torch.inference_mode():
        logits = engine.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    out = []
    start = len(prompt)
    for i, c in enumerate(conts):
        targets = torch.tensor(c)
        # the logits at position t predict token t + 1
        picked = logp[i, start - 1:start - 1 + len(c)].gather(-1, targets[:, None]).squeeze(-1)
        out.append(float(picked.sum()))
    return out
