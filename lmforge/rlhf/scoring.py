"""Log-probabilities of labelled tokens, per token and per sequence, for padded and padding-free batches.

The preference trainer scores whole responses; some objectives weight the tokens of a response
unequally before summing (LD-DPO's length desensitisation) or score every token of the
sequence rather than the reply alone (ORPO's NLL over prompt and reply). So scoring keeps the
labelled tokens' log-probs as a flat vector with the sequence each belongs to
(:class:`TokenLogps`), and sums them per sequence only when asked (:class:`SequenceScores`).
Only labelled positions are upcast to float32, never the full ``[n, T, V]`` logits.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100

__all__ = ["SequenceScores", "TokenLogps", "token_log_probs", "sequence_log_probs", "whole_sequence_labels",
           "ld_weights", "model_inputs", "split_batch", "count_sequences", "prompt_completion_batch"]


class SequenceScores(NamedTuple):
    """Per-sequence sums of labelled-token log-probs and the number of labelled tokens, both [n]."""

    sums: Tensor
    counts: Tensor

    def logps(self, average: bool) -> Tensor:
        return self.sums / self.counts.clamp(min=1) if average else self.sums


class TokenLogps(NamedTuple):
    """The log-probs [N] of every labelled token, in sequence order, and the sequence [N] each belongs to."""

    values: Tensor
    seq: Tensor
    n: int

    def scores(self, weights: Tensor | None = None) -> SequenceScores:
        """Per-sequence (weighted) sums and plain token counts."""
        zeros = torch.zeros(self.n, dtype=torch.float32, device=self.values.device)
        values = self.values if weights is None else self.values * weights
        return SequenceScores(zeros.index_add(0, self.seq, values),
                              zeros.index_add(0, self.seq, torch.ones_like(self.values)))

    @staticmethod
    def cat(first: "TokenLogps", second: "TokenLogps") -> "TokenLogps":
        """The sequences of ``first`` then those of ``second`` (scored in two forward passes)."""
        return TokenLogps(torch.cat([first.values, second.values]), torch.cat([first.seq, second.seq + first.n]),
                          first.n + second.n)


def token_log_probs(logits: Tensor, labels: Tensor, position_ids: Tensor | None = None) -> TokenLogps:
    """Log-probs of each sequence's labelled tokens.

    ``labels`` are unshifted (``labels[t]`` is predicted by ``logits[t-1]``). Padded batches hold
    one sequence per row; with ``position_ids`` (padding-free) the sequences are the runs that
    start where the position is 0, and a token that starts a sequence is never a target.
    """
    logits, targets = logits[:, :-1], labels[:, 1:]
    if position_ids is None:
        n = labels.shape[0]
        seg = torch.arange(n, device=labels.device)[:, None].expand_as(targets)
    else:
        starts = position_ids == 0
        seg_all = starts.reshape(-1).long().cumsum(0).reshape(starts.shape) - 1
        n = int(starts.sum())
        seg = seg_all[:, 1:]
        targets = targets.masked_fill(starts[:, 1:], IGNORE_INDEX)
    mask = targets != IGNORE_INDEX
    picked = logits[mask].float()                                     # [N, V], labelled rows only
    tgt = targets[mask]
    values = picked.gather(-1, tgt[:, None]).squeeze(-1) - picked.logsumexp(-1)
    return TokenLogps(values, seg[mask], n)


def sequence_log_probs(logits: Tensor, labels: Tensor, position_ids: Tensor | None = None) -> SequenceScores:
    """Summed log-probs of each sequence's labelled tokens (see :func:`token_log_probs`)."""
    return token_log_probs(logits, labels, position_ids).scores()


def whole_sequence_labels(batch: dict[str, Any], prefix: str = "") -> Tensor:
    """Labels that make every real token a target (prompt included), padding excluded."""
    ids = batch[f"{prefix}input_ids"]
    attn = batch.get(f"{prefix}attention_mask")
    return ids.masked_fill(attn == 0, IGNORE_INDEX) if attn is not None else ids.clone()


def ld_weights(tokens: TokenLogps, n_pairs: int, alpha: float) -> Tensor:
    """LD-DPO token weights: 1 for the first ``l_p`` tokens of a reply, ``alpha`` after them.

    ``l_p = min(|y_c|, |y_r|)`` is the pair's public length; sequences ``0..n_pairs-1`` are the chosen
    replies and ``n_pairs..2 n_pairs-1`` the rejected ones, in pair order. Then
    ``log p(y) = sum_{t <= l_p} log p_t + alpha sum_{t > l_p} log p_t`` (Liu et al. 2024, "LD-DPO: Length
    Desensitization in Direct Preference Optimization", eq. 9), so the longer reply's excess tokens no
    longer dominate the difference of the two log-likelihoods.
    """
    counts = torch.bincount(tokens.seq, minlength=tokens.n)
    public = torch.minimum(counts[:n_pairs], counts[n_pairs:2 * n_pairs]).repeat(2)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(tokens.values.numel(), device=tokens.values.device) - starts[tokens.seq]
    ones = torch.ones_like(tokens.values)
    return torch.where(rank < public[tokens.seq], ones, ones * alpha)


def prompt_completion_batch(parts: list[tuple[list[int], list[int], list[int]]], pad: int, device: Any
                            ) -> dict[str, Tensor]:
    """(prompt ids, completion ids, completion mask) per sequence -> left-padded prompts, then right-padded
    completions, ``[pad.. prompt | completion ..pad]``: ``input_ids``, ``attention_mask``, ``position_ids``,
    ``completion_ids``, ``completion_mask`` (GRPO rollouts and GKD batches)."""
    P = max(len(p) for p, _, _ in parts)
    C = max(1, max(len(c) for _, c, _ in parts))
    ids, attn, comp, cmask = [], [], [], []
    for p, c, m in parts:
        ids.append([pad] * (P - len(p)) + p + c + [pad] * (C - len(c)))
        attn.append([0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (C - len(c)))
        comp.append(c + [pad] * (C - len(c)))
        cmask.append(m + [0] * (C - len(m)))
    attention_mask = torch.tensor(attn, device=device)
    return {"input_ids": torch.tensor(ids, device=device), "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
            "completion_ids": torch.tensor(comp, device=device),
            "completion_mask": torch.tensor(cmask, device=device, dtype=torch.float32)}


# what a vision-language batch adds (trainers/vision_collator.py): the pixels of every sequence's images and videos
PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
              "mm_token_type_ids", "image_sizes")


def model_inputs(batch: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {"input_ids": batch[f"{prefix}input_ids"]}
    for key in ("attention_mask", "position_ids", *PIXEL_KEYS):
        if batch.get(f"{prefix}{key}") is not None:
            out[key] = batch[f"{prefix}{key}"]
    return out


def split_batch(batch: dict[str, Any], n_first: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first ``n_first`` sequences and the rest, for a padded or a padding-free batch (of text)."""
    if any(batch.get(k) is not None for k in PIXEL_KEYS):
        raise ValueError("batches with images or videos go through the model whole: leave --concat_forward on")
    keys = [k for k in ("input_ids", "labels", "attention_mask", "position_ids") if batch.get(k) is not None]
    if batch.get("position_ids") is not None and batch["input_ids"].shape[0] == 1:
        starts = (batch["position_ids"][0] == 0).nonzero().squeeze(1)
        cut = int(starts[n_first])
        return {k: batch[k][:, :cut] for k in keys}, {k: batch[k][:, cut:] for k in keys}
    return {k: batch[k][:n_first] for k in keys}, {k: batch[k][n_first:] for k in keys}


def count_sequences(batch: dict[str, Any], prefix: str = "") -> int:
    pos = batch.get(f"{prefix}position_ids")
    if pos is not None and batch[f"{prefix}input_ids"].shape[0] == 1:
        return int((pos == 0).sum())
    return batch[f"{prefix}input_ids"].shape[0]
