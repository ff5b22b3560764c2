"""Preference losses as pure functions of per-sequence log-probabilities.

Nothing here touches a model: each function takes the summed (or length-averaged, where the
paper says so) log-probabilities of whole responses and returns **per-example** losses, so the
trainer decides how to reduce them and tests can check each formula on numbers worked out by
hand. Notation used in the docstrings:

    pi_c, pi_r     log pi_theta(y_c | x), log pi_theta(y_r | x)  (policy; c = chosen, r = rejected)
    ref_c, ref_r   the same under the frozen reference model pi_ref
    h              (pi_c - ref_c) - (pi_r - ref_r)               (difference of log-ratios)
    sigma          the logistic function;  log sigma(x) = -softplus(-x)

The implicit rewards reported as ``rewards/chosen`` and ``rewards/rejected`` are
``beta * (pi - ref)`` for the reference-based losses and ``beta * pi`` for the reference-free
ones (ORPO, SimPO, CPO), detached.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DPO_LOSS_TYPES",
    "AVERAGED_LOSS_TYPES",
    "PairLogps",
    "CPO_LOSS_TYPES",
    "PreferenceLoss",
    "dpo_loss",
    "cpo_loss",
    "simpo_loss",
    "orpo_loss",
    "kto_loss",
    "kto_kl_estimate",
    "bradley_terry_loss",
    "log1mexp",
]


class PreferenceLoss(NamedTuple):
    """Per-example losses [B] and the detached implicit rewards [B] of the chosen and rejected responses."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


# ----------------------------------------------------------------------------- DPO variants
# Each variant maps a batch of pairs (``PairLogps``: policy and reference log-probs, so the log-ratios
# a = pi_c - ref_c and b = pi_r - ref_r, h = a - b) to per-example losses. They are registered by name
# for ``--loss_type``; ``AVERAGED_LOSS_TYPES`` are fed length-averaged log-probs by the trainer.


class PairLogps(NamedTuple):
    """Per-pair log-probs [B] of the policy (pc, pr) and the reference (rc, rr)."""

    pc: Tensor
    pr: Tensor
    rc: Tensor
    rr: Tensor

    @property
    def a(self) -> Tensor:
        return self.pc - self.rc

    @property
    def b(self) -> Tensor:
        return self.pr - self.rr


class PairOptions(NamedTuple):
    """Settings of the variants that need more than beta and label_smoothing."""

    beta: float = 0.1
    eps: float = 0.0              # label_smoothing
    bco_delta: float = 0.0        # bco_pair: the running mean reward delta
    discopop_tau: float = 0.05    # discopop: temperature of the modulation


PairLossFn = Callable[[PairLogps, PairOptions], Tensor]
_DPO_VARIANTS: dict[str, PairLossFn] = {}
AVERAGED_LOSS_TYPES = ("ipo", "sigmoid_norm")


def _variant(name: str) -> Callable[[PairLossFn], PairLossFn]:
    def add(fn: PairLossFn) -> PairLossFn:
        _DPO_VARIANTS[name] = fn
        return fn

    return add


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@_variant("sigmoid")
def sigmoid_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """DPO: ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``.

    With ``eps = 0`` this is the DPO objective (Rafailov et al. 2023, "Direct Preference
    Optimization: Your Language Model is Secretly a Reward Model", eq. 7). ``eps > 0`` is
    conservative DPO, which assumes each label is flipped with probability ``eps`` (Mitchell 2023,
    "A note on DPO with noisy preferences & relationship to IPO").
    """
    return _smoothed_logistic(o.beta * (x.a - x.b), o.eps)


@_variant("robust")
def robust_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """Robust DPO: ``[-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)``.

    An unbiased estimate of the clean-label DPO loss when labels flip with probability
    ``eps < 1/2`` (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with
    Noisy Feedback").
    """
    eps = o.eps
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
    z = o.beta * (x.a - x.b)
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@_variant("hinge")
def hinge_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """SLiC hinge: ``max(0, 1 - beta h)``.

    The rank-calibration loss of Zhao et al. 2023 ("SLiC-HF: Sequence Likelihood Calibration with
    Human Feedback") with margin ``1/beta``, applied to reference-relative log-probs as in the
    comparisons of later DPO work.
    """
    return torch.relu(1.0 - o.beta * (x.a - x.b))


@_variant("ipo")
def ipo_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """IPO: ``(h - 1 / (2 beta))^2`` where ``beta`` is the paper's ``tau``.

    Regresses the log-ratio gap to a finite target instead of pushing it to infinity, which
    avoids DPO's over-fitting on deterministic preferences (Azar et al. 2023, "A General
    Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17). The trainer
    feeds it length-averaged log-probs (``AVERAGED_LOSS_TYPES``), as the IPO authors'
    experiments do: on sums the fixed target would mean something different for every length.
    """
    return (x.a - x.b - 1.0 / (2.0 * o.beta)) ** 2


@_variant("exo_pair")
def exo_pair_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """EXO (pairwise): reverse KL from ``p = softmax(beta a, beta b)`` to the target ``(1 - eps, eps)``.

    ``sigma(beta h) [log sigma(beta h) - log(1 - eps)] + sigma(-beta h) [log sigma(-beta h) - log eps]``
    (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", the
    pairwise case K = 2). ``eps`` must be > 0 (the paper uses 1e-3; that is the default here when it is 0).
    """
    eps = o.eps or 1e-3
    z = o.beta * (x.a - x.b)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


@_variant("nca_pair")
def nca_pair_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """NCA (pairwise): ``-log sigma(beta a) - 1/2 log sigma(-beta a) - 1/2 log sigma(-beta b)``.

    Optimises absolute rather than relative likelihoods, so the chosen response's likelihood
    does not fall (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards", NCA loss with K = 2 responses).
    """
    beta = o.beta
    return -F.logsigmoid(beta * x.a) - 0.5 * F.logsigmoid(-beta * x.a) - 0.5 * F.logsigmoid(-beta * x.b)


@_variant("sppo_hard")
def sppo_hard_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """SPPO with hard win probabilities: ``(a - 1/(2 beta))^2 + (b + 1/(2 beta))^2``.

    Each log-ratio is regressed to ``eta (P(win) - 1/2)`` with ``eta = 1/beta`` and
    ``P(win) = 1`` for the chosen, ``0`` for the rejected response (Wu et al. 2024, "Self-Play
    Preference Optimization for Language Model Alignment", the SPPO loss).
    """
    return (x.a - 0.5 / o.beta) ** 2 + (x.b + 0.5 / o.beta) ** 2


@_variant("apo_zero")
def apo_zero_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """APO-zero: ``1 - sigma(beta a) + sigma(beta b)``: raise the chosen likelihood, lower the
    rejected one, for when the chosen responses are better than the model's own (D'Oosterlinck et
    al. 2024, "Anchored Preference Optimization and Contrastive Revisions")."""
    return 1.0 - torch.sigmoid(o.beta * x.a) + torch.sigmoid(o.beta * x.b)


@_variant("apo_down")
def apo_down_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """APO-down: ``sigma(beta a) + 1 - sigma(beta (a - b))``: lower both likelihoods, the rejected
    one more, for when the model is already better than the chosen responses (D'Oosterlinck et al.
    2024)."""
    return torch.sigmoid(o.beta * x.a) + 1.0 - torch.sigmoid(o.beta * (x.a - x.b))


@_variant("sigmoid_norm")
def sigmoid_norm_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """Length-normalised DPO: the ``sigmoid`` loss on length-averaged log-probs,
    ``-log sigma(beta (a / |y_c| - b / |y_r|))`` (Lambert et al. 2024, "Tulu 3", the length-normalised
    DPO objective). The trainer does the averaging (``AVERAGED_LOSS_TYPES``): the formula is DPO's."""
    return sigmoid_loss(x, o)


@_variant("bco_pair")
def bco_pair_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """BCO on pairs: ``-log sigma(beta a - delta) - log sigma(-(beta b - delta))``.

    The chosen reply is a positive and the rejected one a negative of a binary classifier whose
    logit is the implicit reward ``beta log(pi / pi_ref)``; ``delta`` (``bco_delta``) is the reward
    shift, the running mean of the rewards seen so far, which the trainer keeps over every process
    (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", eq. 9 and
    the reward shift of section 4.2).
    """
    return -F.logsigmoid(o.beta * x.a - o.bco_delta) - F.logsigmoid(-(o.beta * x.b - o.bco_delta))


@_variant("aot")
def aot_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """AOT (paired): the logistic loss on sorted differences, ``h_(i) = sort(pi_c - pi_r)_i - sort(ref_c - ref_r)_i``.

    Asks the policy's distribution of chosen-over-rejected log-likelihood margins to dominate the
    reference's in the first order (stochastic dominance), which a one-dimensional optimal transport
    solves by sorting both samples (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via
    Optimal Transport", the paired AOT loss with the logistic penalty). The sort runs over the batch
    on each process (a batch-level estimator, as in the paper); ``eps`` smooths as in ``sigmoid``.
    """
    margins = torch.sort(x.pc - x.pr, dim=0).values
    ref_margins = torch.sort(x.rc - x.rr, dim=0).values
    return _smoothed_logistic(o.beta * (margins - ref_margins), o.eps)


@_variant("aot_pair")
def aot_pair_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """AOT (unpaired form): ``h_(i) = sort(a)_i - sort(b)_i``: the distribution of the chosen replies'
    log-ratios must dominate the rejected replies' (Melnyk et al. 2024, the unpaired AOT loss; the name
    is TRL's). Sorted over each process's batch, like ``aot``."""
    return _smoothed_logistic(o.beta * (torch.sort(x.a, dim=0).values - torch.sort(x.b, dim=0).values), o.eps)


@_variant("discopop")
def discopop_loss(x: PairLogps, o: PairOptions) -> Tensor:
    """DiscoPOP (log-ratio modulated loss): ``(1 - s) * (-log sigma(rho)) + s * exp(-rho)``,
    ``rho = beta h`` and ``s = sigma(rho / tau)``.

    A blend of the logistic (DPO) and exponential losses, weighted by how far the pair is already
    separated, found by LLM-driven objective discovery (Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for Large Language Models", LRML; ``tau = 0.05`` there).
    """
    rho = o.beta * (x.a - x.b)
    s = torch.sigmoid(rho / o.discopop_tau)
    return (1.0 - s) * -F.logsigmoid(rho) + s * torch.exp(-rho)


DPO_LOSS_TYPES: tuple[str, ...] = tuple(_DPO_VARIANTS)
CPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, bco_delta: float = 0.0,
             discopop_tau: float = 0.05) -> PreferenceLoss:
    """DPO and its variants on per-sequence log-probs [B]; ``loss_type`` picks the variant.

    ``sigmoid`` (default) is ``-log sigma(beta h)`` (Rafailov et al. 2023, eq. 7); the others are
    documented on their functions above (``DPO_LOSS_TYPES``). Rewards are ``beta (pi - ref)``.
    """
    if loss_type not in _DPO_VARIANTS:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    x = PairLogps(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = _DPO_VARIANTS[loss_type](x, PairOptions(beta, label_smoothing, bco_delta, discopop_tau))
    return PreferenceLoss(losses, (beta * x.a).detach(), (beta * x.b).detach())


def cpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> PreferenceLoss:
    """CPO's preference term: DPO with a uniform reference, ``-log sigma(beta (pi_c - pi_r))``.

    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation": the reference model drops out of the upper bound
    they derive; ``hinge`` and ``ipo`` apply those variants to the same reference-free ``h`` (the
    trainer feeds ``ipo`` length-averaged log-probs, as for DPO). The full CPO loss adds
    ``cpo_alpha`` times the NLL of the chosen response, done by the trainer.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected one of {', '.join(CPO_LOSS_TYPES)}")
    zero = torch.zeros_like(policy_chosen)
    return dpo_loss(policy_chosen, policy_rejected, zero, zero, beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing)


def simpo_loss(policy_chosen_avg: Tensor, policy_rejected_avg: Tensor, *, beta: float = 2.0, gamma: float = 1.0,
               label_smoothing: float = 0.0) -> PreferenceLoss:
    """SimPO: ``-log sigma(beta avg_c - beta avg_r - gamma)`` on length-averaged log-probs.

    The average log-likelihood is the reward (no reference model) and ``gamma`` a target margin
    (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    eq. 6). ``label_smoothing`` mixes in the flipped-label term as conservative DPO does.
    """
    z = beta * (policy_chosen_avg - policy_rejected_avg) - gamma
    eps = label_smoothing
    losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return PreferenceLoss(losses, (beta * policy_chosen_avg).detach(), (beta * policy_rejected_avg).detach())


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative x (Maechler 2012)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_avg: Tensor, policy_rejected_avg: Tensor, *, beta: float = 0.1) -> PreferenceLoss:
    """ORPO's odds-ratio term: ``-beta log sigma(log odds(y_c) - log odds(y_r))``.

    ``odds(y) = P(y) / (1 - P(y))`` with ``P(y) = exp(avg log-prob of y)``, so
    ``log odds = avg - log(1 - exp(avg))`` (Hong et al. 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model", eqs. 4-7; ``beta`` is the paper's ``lambda``). The full
    ORPO loss adds the NLL of the chosen response, done by the trainer. Rewards are ``beta * avg``.
    """
    log_odds = (policy_chosen_avg - policy_rejected_avg) - (log1mexp(policy_chosen_avg) - log1mexp(policy_rejected_avg))
    losses = -beta * F.logsigmoid(log_odds)
    return PreferenceLoss(losses, (beta * policy_chosen_avg).detach(), (beta * policy_rejected_avg).detach())


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point ``z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])``, detached.

    ``y'_i`` is a completion that does not belong to ``x_i`` (the trainer pairs ``x_i`` with the
    next row's completion), so the mean estimates ``KL(pi_theta(y|x) || pi_ref(y|x))`` over the
    batch (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    section 4.1: a biased but low-variance estimate; no gradient flows through it). The mean is over
    the *global* batch (every process's rows, ``global_mean``) and the clamp comes after it: clamping
    each process's mean first would bias z0 upwards whenever one process's estimate is negative.
    """
    from lmforge.utils.distributed import global_mean

    diff = (policy_kl_logps - ref_kl_logps).detach().float()
    mean = global_mean(diff.sum(), torch.tensor(float(diff.numel()), device=diff.device))
    return mean.to(device=diff.device, dtype=diff.dtype).clamp(min=0)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl: Tensor | float, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """KTO on unpaired rows: ``lambda_y - v(x, y)`` per row, returns ``(losses [B], rewards [B])``.

    With ``r = pi - ref`` and the reference point ``z0 = kl``:
    ``v = lambda_D sigma(beta (r - z0))`` for a desirable ``y`` and
    ``v = lambda_U sigma(beta (z0 - r))`` for an undesirable one (Ethayarajh et al. 2024, the KTO loss),
    so a desirable row's loss is ``lambda_D (1 - sigma(beta (r - z0)))`` and an undesirable one's
    ``lambda_U (1 - sigma(beta (z0 - r)))``. Rewards are ``beta * r`` (detached).
    """
    r = policy_logps - ref_logps
    desirable = desirable.to(torch.bool)
    kl = torch.as_tensor(kl, dtype=r.dtype, device=r.device)
    losses = torch.where(desirable, desirable_weight * (1.0 - torch.sigmoid(beta * (r - kl))),
                         undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - r))))
    return losses, (beta * r).detach()


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None, *,
                       center_rewards_coefficient: float = 0.0) -> Tensor:
    """Reward-model loss ``-log sigma(r_c - r_r - m)`` per pair.

    The Bradley-Terry pairwise loss of InstructGPT (Ouyang et al. 2022, "Training language models
    to follow instructions with human feedback", eq. 1) with the Llama 2 margin ``m`` from the
    ``margin`` column, larger for clearer preferences (Touvron et al. 2023, "Llama 2", eq. 2).
    ``center_rewards_coefficient`` adds ``c (r_c + r_r)^2``, which keeps rewards centred on zero
    (Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not
    Eliminate Reward Hacking", section 3).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses
