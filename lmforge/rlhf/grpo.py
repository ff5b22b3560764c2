"""GRPO as pure functions of tensors: group advantages, the clipped token objective, k3 KL, aggregation.

Nothing here touches a model or an engine, so each formula is checked on numbers worked out by
hand (tests/test_grpo.py). Notation (per sequence i of a batch, per completion token t):

    r_i                 the scalar reward of completion i (weighted sum of the reward functions)
    A_i                 its advantage, shared by all its tokens
    rho_t = exp(logp_t - old_t)       ratio of the current to the sampling (old) policy
    kl_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          k3 estimator of KL(pi || pi_ref)
    L_t   = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta kl_t

References: GRPO, Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300), eq. 3 and 4 (group-relative
advantages, k3 KL in the loss); the k3 estimator, J. Schulman, "Approximating KL divergence" (2020);
PPO's clipped ratio, Schulman et al. 2017 (arXiv:1707.06347); asymmetric "clip-higher" and
token-level aggregation, Yu et al. 2025, "DAPO" (arXiv:2503.14476); Dr. GRPO (no length or std
normalisation), Liu et al. 2025, "Understanding R1-Zero-Like Training" (arXiv:2503.20783).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["GRPO_LOSS_TYPES", "SCALE_REWARDS", "GrpoLoss", "group_advantages", "k3_kl", "grpo_token_loss",
           "aggregate_loss", "selective_log_softmax", "zero_std_groups"]

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # keeps A finite when a group's rewards are (nearly) equal


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be a flat tensor of groups of {group_size}, got shape {tuple(rewards.shape)}")
    return rewards.view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", batch_std: Tensor | None = None) -> Tensor:
    """``A_i = (r_i - mean(group)) / (std + 1e-4)``; ``scale``: whose std divides (group, batch) or none.

    ``rewards`` are flat, ``group_size`` consecutive entries per prompt. ``batch`` divides by the std
    of all rewards of the batch (``batch_std`` overrides it: the std over every process), which
    keeps easy and hard prompts on one scale; ``none`` is Dr. GRPO's unscaled advantage.
    The std is the unbiased one (``torch.std``), as in the DeepSeekMath formula.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale!r}")
    g = _grouped(rewards.float(), group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
        centred = centred / (std + STD_EPS)
    elif scale == "batch":
        std = batch_std if batch_std is not None else (g.std() if g.numel() > 1 else g.new_zeros(()))
        centred = centred / (std + STD_EPS)
    return centred.reshape(-1)


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[n_groups] bool: groups whose rewards are all equal (they carry no learning signal)."""
    g = _grouped(rewards.float(), group_size)
    return (g.max(dim=1).values - g.min(dim=1).values).abs() <= 1e-8


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


class GrpoLoss(NamedTuple):
    """The aggregated loss and per-token pieces for the metrics (``kl`` is None when beta is 0)."""

    loss: Tensor
    per_token: Tensor
    kl: Tensor | None
    low_clipped: Tensor   # [B, T] bool: ratio below 1 - eps_low with A < 0 (the clip bounds the objective)
    high_clipped: Tensor  # [B, T] bool: ratio above 1 + eps_high with A > 0


def grpo_token_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *,
                    epsilon_low: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                    ref_logps: Tensor | None = None, loss_type: str = "grpo",
                    max_completion_length: int | None = None) -> GrpoLoss:
    """The clipped GRPO objective per token, then aggregated by ``loss_type`` (see :func:`aggregate_loss`).

    ``logps``, ``old_logps``, ``ref_logps`` and ``mask`` are [B, T] (completion tokens only), ``advantages``
    [B]. With ``old_logps == logps.detach()`` (one update per rollout) the ratio is 1 and the gradient
    is the plain policy gradient ``-A grad logp``.
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages[:, None].to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    loss = aggregate_loss(per_token, mask, loss_type, max_completion_length)
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
    return GrpoLoss(loss, per_token, kl, low, high)


def aggregate_loss(per_token: Tensor, mask: Tensor, loss_type: str = "grpo",
                   max_completion_length: int | None = None) -> Tensor:
    """Reduce [B, T] token losses to a scalar over the ``mask``-ed (model-generated) tokens.

    - ``grpo``: mean over each sequence's tokens, then mean over sequences (DeepSeekMath eq. 3;
      a long sequence's tokens weigh less than a short one's);
    - ``bnpo``: mean over all tokens of the batch (DAPO's token-level loss: every token weighs the same);
    - ``dr_grpo``: sum over all tokens / (B x max_completion_length), a constant, so neither
      length biases the gradient (Dr. GRPO).
    """
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        length = max_completion_length or per_token.shape[1]
        return (per_token * m).sum() / (per_token.shape[0] * length)
    raise ValueError(f"grpo_loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}, got {loss_type!r}")


def selective_log_softmax(logits: Tensor, index: Tensor, chunk: int = 8) -> Tensor:
    """``log_softmax(logits).gather(index)`` in float32, a few rows at a time.

    ``logits`` [B, T, V] may be bf16; only ``chunk`` rows are upcast at once, so the float32 copy
    of a large-vocabulary batch never exists whole.
    """
    out = []
    for s in range(0, logits.shape[0], chunk):
        part = logits[s:s + chunk].float()
        picked = part.gather(-1, index[s:s + chunk, :, None]).squeeze(-1)
        out.append(picked - part.logsumexp(-1))
    return torch.cat(out) if out else logits.new_zeros(index.shape, dtype=torch.float32)
