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
normalisation), Liu et al. 2025, "Understanding R1-Zero-Like Training" (arXiv:2503.20783); the sequence
ratio, Zheng et al. 2025, "Group Sequence Policy Optimization" (GSPO, arXiv:2507.18071); CISPO, MiniMax
2025, "MiniMax-M1" (arXiv:2506.13585); SAPO, Qwen team 2025, "Soft Adaptive Policy Optimization";
two-sided clipping, Prime Intellect 2025, "INTELLECT-2" (arXiv:2505.07291); entropy token selection,
Wang et al. 2025, "Beyond the 80/20 Rule" (arXiv:2506.01939); off-policy sequence masking, DeepSeek-AI
2025, "DeepSeek-V3.2"; each reward normalised in its group before the weighted sum, as GDPO ("group
reward-decoupled normalisation") proposes.

A completion no reward function could score (every function returned None; NaN here) is left out of
its group's statistics and gets advantage 0: counting it as reward 0 would pull the baseline down and
push the model away from a reply nobody judged.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["GRPO_LOSS_TYPES", "SCALE_REWARDS", "GrpoLoss", "group_advantages", "reward_advantages", "k3_kl",
           "grpo_token_loss", "aggregate_loss", "selective_log_softmax", "zero_std_groups", "scored",
           "truncated_mask", "entropy_threshold", "entropy_mask", "off_policy_sequence_mask", "token_entropy",
           "BatchStd"]

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # keeps A finite when a group's rewards are (nearly) equal


class BatchStd(NamedTuple):
    """Sums over every process of the scored rewards: ``sum(r)``, ``sum(r^2)``, ``n`` (for the batch std)."""

    total: float
    squares: float
    count: float

    @staticmethod
    def local(rewards: Tensor) -> Tensor:
        """[3] float64 sums of this process's scored (finite) rewards; reduce them with ``global_sum``."""
        r = rewards[~torch.isnan(rewards)].double()
        return torch.stack([r.sum(), (r ** 2).sum(), torch.tensor(float(r.numel()), dtype=torch.float64)])

    def std(self) -> float:
        """Unbiased std of the global batch (0 with fewer than two rewards)."""
        if self.count < 2:
            return 0.0
        return max(self.squares - self.total ** 2 / self.count, 0.0) ** 0.5 / (self.count - 1) ** 0.5


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be a flat tensor of groups of {group_size}, got shape {tuple(rewards.shape)}")
    return rewards.view(-1, group_size)


def scored(rewards: Tensor) -> Tensor:
    """[N] bool: completions some reward function scored (finite reward)."""
    return ~torch.isnan(rewards)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", batch_std: Tensor | float | None = None
                     ) -> Tensor:
    """``A_i = (r_i - mean(group)) / (std + 1e-4)``; ``scale``: whose std divides (group, batch) or none.

    ``rewards`` are flat, ``group_size`` consecutive entries per prompt; NaN marks an unscored completion,
    which is left out of its group's mean and std and gets ``A = 0``. ``batch`` divides by the std of
    all scored rewards of the batch (``batch_std`` overrides it: the std over every process, see
    :class:`BatchStd`), which keeps easy and hard prompts on one scale; ``none`` is Dr. GRPO's unscaled
    advantage. The std is the unbiased one (``torch.std``), as in the DeepSeekMath formula.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale!r}")
    g = _grouped(rewards.float(), group_size)
    ok = ~torch.isnan(g)
    n = ok.sum(dim=1, keepdim=True)
    values = torch.where(ok, g, torch.zeros_like(g))
    mean = values.sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(ok, g - mean, torch.zeros_like(g))
    if scale == "group":
        var = (centred ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
        std = torch.where(n > 1, var.sqrt(), torch.zeros_like(var))
        centred = centred / (std + STD_EPS)
    elif scale == "batch":
        if batch_std is None:
            flat = g[ok]
            batch_std = flat.std() if flat.numel() > 1 else g.new_zeros(())
        centred = centred / (torch.as_tensor(batch_std, dtype=g.dtype) + STD_EPS)
    return centred.reshape(-1)


def reward_advantages(table: Tensor, weights: Tensor, group_size: int, scale: str = "group",
                      aggregation: str = "sum", batch_stds: Tensor | None = None) -> Tensor:
    """Advantages [N] from a reward table [N, F] (NaN: that function did not score that completion).

    - ``sum``: the weighted sum over functions (a NaN counts as 0; all NaN: unscored), then
      :func:`group_advantages`;
    - ``normalize_then_sum``: each function's own group advantage (its NaNs left out), then their
      weighted sum, so a reward with a small range is not drowned by one with a large range (GDPO).
      ``batch_stds`` [F] are each function's batch std over every process, for ``scale = batch``.

    A completion that no function scored gets advantage 0 either way.
    """
    if aggregation == "sum":
        from lmforge.rlhf.rewards import weighted_rewards

        total = weighted_rewards(table, weights.tolist())
        return group_advantages(total, group_size, scale, None if batch_stds is None else batch_stds[0])
    if aggregation != "normalize_then_sum":
        raise ValueError(f"reward_aggregation must be sum or normalize_then_sum, got {aggregation!r}")
    out = torch.zeros(table.shape[0])
    for j in range(table.shape[1]):
        std = None if batch_stds is None else batch_stds[j]
        out = out + weights[j] * group_advantages(table[:, j], group_size, scale, std)
    return out


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[n_groups] bool: groups whose scored rewards are all equal (they carry no learning signal)."""
    g = _grouped(rewards.float(), group_size)
    ok = ~torch.isnan(g)
    hi = torch.where(ok, g, torch.full_like(g, -float("inf"))).max(dim=1).values
    lo = torch.where(ok, g, torch.full_like(g, float("inf"))).min(dim=1).values
    return ~(ok.sum(dim=1) > 1) | ((hi - lo).abs() <= 1e-8)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


# ----------------------------------------------------------------------------- token selection


def truncated_mask(mask: Tensor, truncated: Tensor) -> Tensor:
    """``mask`` with the rows of completions cut at the length limit zeroed: a reply that never ended has no
    outcome to learn from (DAPO's overlong filtering)."""
    return mask * (~truncated.to(torch.bool)).to(mask.dtype)[:, None]


def token_entropy(logits: Tensor, chunk: int = 8) -> Tensor:
    """[B, T] entropy of each position's distribution, in float32, a few rows at a time."""
    out = []
    for s in range(0, logits.shape[0], chunk):
        logp = logits[s:s + chunk].float().log_softmax(-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else logits.new_zeros(logits.shape[:2], dtype=torch.float32)


def entropy_threshold(entropies: Tensor, quantile: float) -> float:
    """The entropy above which a token is in the top ``quantile`` fraction of ``entropies`` (a flat tensor of
    the trained tokens, over every process): the ``1 - quantile`` quantile, linearly interpolated."""
    if entropies.numel() == 0:
        return float("inf")
    return float(torch.quantile(entropies.float(), 1.0 - quantile))


def entropy_mask(entropies: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """[B, T] float: 1 for trained tokens whose entropy is at least ``threshold`` (the "forking" tokens that
    carry most of the learning signal, Wang et al. 2025), else 0."""
    return ((entropies >= threshold) & (mask > 0)).to(mask.dtype)


def off_policy_sequence_mask(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                             threshold: float) -> Tensor:
    """[B] bool, True where the sequence trains: False for a negative-advantage completion whose mean
    log-ratio ``(1/|o|) sum_t log(pi_old / pi)`` (a KL estimate between the sampling and the current policy)
    exceeds ``threshold`` — a mistake the current policy would no longer make teaches nothing but noise."""
    m = mask.to(torch.float32)
    kl = ((old_logps - logps.detach()).float() * m).sum(-1) / m.sum(-1).clamp(min=1)
    return ~((advantages < 0) & (kl > threshold))


# ----------------------------------------------------------------------------- the loss


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
                    max_completion_length: int | None = None, importance_sampling_level: str = "token",
                    delta: float | None = None, sapo_temperatures: tuple[float, float] = (1.0, 1.05),
                    pg_mask: Tensor | None = None, normalizer: Tensor | float | None = None) -> GrpoLoss:
    """The GRPO-family objective per token, then aggregated by ``loss_type`` (see :func:`aggregate_loss`).

    ``logps``, ``old_logps``, ``ref_logps`` and ``mask`` are [B, T] (completion tokens only), ``advantages``
    [B]. With ``old_logps == logps.detach()`` (one update per rollout) the ratio is 1 and the gradient
    is the plain policy gradient ``-A grad logp``. The ratio ``rho`` is per token, or with
    ``importance_sampling_level = sequence`` (GSPO) the sequence's ``exp(mean_t log(pi / pi_old))`` shared
    by its tokens. Per token, before the KL term:

    - grpo, bnpo, dr_grpo, dapo: ``-min(rho' A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` with
      ``rho' = min(rho, delta)`` under two-sided clipping (``delta``), else ``rho``;
    - cispo: ``-sg(min(rho, 1 + eps_high)) A log pi``: the clipped importance weight scales the gradient
      of every token instead of dropping the clipped ones;
    - sapo: ``-A (4 / tau) sigma(tau (rho - 1))``: a soft gate whose gradient is ``A`` at ``rho = 1`` and
      fades smoothly away from it; ``tau`` is ``sapo_temperatures[0]`` where ``A > 0``, ``[1]`` where
      ``A < 0``.

    ``pg_mask`` [B, T] (entropy / off-policy selection) multiplies the policy term only; ``mask`` decides
    which tokens are averaged. ``normalizer`` is dapo/cispo's token count (see :func:`aggregate_loss`).
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages[:, None].to(logps.dtype)
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":
        m = mask.to(logps.dtype)
        log_ratio = ((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(logps)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be token or sequence, got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=1 + eps_high).detach() * adv * logps
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, sapo_temperatures[0]),
                          torch.full_like(adv, sapo_temperatures[1]))
        per_token = -adv * torch.sigmoid(tau * (ratio - 1)) * (4.0 / tau)
    else:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
        unclipped = torch.clamp(ratio, max=delta) if delta is not None else ratio
        per_token = -torch.min(unclipped * adv, clipped * adv)
    if pg_mask is not None:
        per_token = per_token * pg_mask.to(per_token.dtype)
    kl = None
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    loss = aggregate_loss(per_token, mask, loss_type, max_completion_length, normalizer)
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
    return GrpoLoss(loss, per_token, kl, low, high)


def aggregate_loss(per_token: Tensor, mask: Tensor, loss_type: str = "grpo",
                   max_completion_length: int | None = None, normalizer: Tensor | float | None = None) -> Tensor:
    """Reduce [B, T] token losses to a scalar over the ``mask``-ed (model-generated) tokens.

    - ``grpo`` (and ``sapo``): mean over each sequence's tokens, then mean over sequences (DeepSeekMath
      eq. 3; a long sequence's tokens weigh less than a short one's);
    - ``bnpo``: mean over all tokens of the micro-batch;
    - ``dr_grpo``: sum over all tokens / (B x max_completion_length), a constant, so neither
      length biases the gradient (Dr. GRPO);
    - ``dapo`` (and ``cispo``): sum / ``normalizer``, the number of trained tokens of the *whole optimizer
      step* (every micro-batch, every process; DAPO's token-level loss), which the trainer counts before
      the first backward and passes in divided by the number of processes (gradients are averaged over
      them); without it, the micro-batch's own count (then it equals bnpo).
    """
    m = mask.to(per_token.dtype)
    if loss_type in ("grpo", "sapo"):
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo" or (loss_type in ("dapo", "cispo") and normalizer is None):
        return (per_token * m).sum() / m.sum().clamp(min=1)
    if loss_type in ("dapo", "cispo"):
        return (per_token * m).sum() / torch.as_tensor(normalizer, dtype=per_token.dtype).clamp(min=1e-8)
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
