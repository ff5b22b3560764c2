"""Every preference, RL and distillation loss against a reference written out from its paper, on fixed tensors.

The references below are plain Python on floats, one line per formula as the paper states it (equation
numbers in the comments); they share no code with lmforge.rlhf. Issue #18's numbers are regression cases
(CPO-ipo 470.3 vs 35.7; KTO's z0 is in tests/test_rlhf_distributed.py, which needs two processes).
"""
from __future__ import annotations

import math

import pytest
import torch

from lmforge.rlhf import grpo as G
from lmforge.rlhf import losses as L
from lmforge.rlhf.gkd import generalized_jsd

# five pairs of per-sequence log-probs: policy chosen/rejected, reference chosen/rejected, reply lengths
PC = [-5.0, -3.0, -12.5, -0.7, -20.0]
PR = [-7.0, -2.0, -11.0, -4.2, -18.5]
RC = [-6.0, -2.5, -12.0, -1.5, -21.0]
RR = [-6.5, -2.5, -12.0, -3.0, -18.0]
NC = [4, 2, 9, 1, 12]
NR = [6, 2, 7, 3, 10]
T = torch.tensor


def lsig(x: float) -> float:  # log sigma(x), stable for the values used
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def close(got, want, tol=1e-5):
    assert torch.as_tensor(got).tolist() == pytest.approx(want, rel=tol, abs=tol)


def dpo(loss_type: str, beta=0.1, eps=0.0, pc=PC, pr=PR, rc=RC, rr=RR, **kw):
    return L.dpo_loss(T(pc), T(pr), T(rc), T(rr), beta=beta, loss_type=loss_type, label_smoothing=eps, **kw).losses


# ----------------------------------------------------------------------------- DPO family


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.3, 0.2)])
def test_dpo_and_conservative_dpo(beta, eps):
    # Rafailov et al. 2023, eq. 7; cDPO (Mitchell 2023): labels flipped with probability eps
    want = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        u = beta * ((pc - rc) - (pr - rr))
        want.append(-(1 - eps) * lsig(u) - eps * lsig(-u))
    close(dpo("sigmoid", beta, eps), want)


def test_robust_dpo():
    # Chowdhury et al. 2024, eq. 9: [(1 - eps) l(beta h) - eps l(-beta h)] / (1 - 2 eps), l(x) = -log sigma(x)
    beta, eps = 0.2, 0.1
    want = [((1 - eps) * -lsig(beta * ((pc - rc) - (pr - rr))) - eps * -lsig(-beta * ((pc - rc) - (pr - rr))))
            / (1 - 2 * eps) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    close(dpo("robust", beta, eps), want)


def test_ipo_and_sigmoid_norm_on_averages():
    # IPO (Azar et al. 2023, eq. 17): (h - 1/(2 tau))^2 with length-averaged log-likelihoods;
    # length-normalised DPO (Tulu 3): -log sigma(beta (a/|y_c| - b/|y_r|))
    pc, pr = [p / n for p, n in zip(PC, NC)], [p / n for p, n in zip(PR, NR)]
    rc, rr = [p / n for p, n in zip(RC, NC)], [p / n for p, n in zip(RR, NR)]
    tau = 0.25
    want = [((a - c) - (b - d) - 1 / (2 * tau)) ** 2 for a, b, c, d in zip(pc, pr, rc, rr)]
    close(dpo("ipo", tau, pc=pc, pr=pr, rc=rc, rr=rr), want)
    want = [-lsig(0.5 * ((a - c) - (b - d))) for a, b, c, d in zip(pc, pr, rc, rr)]
    close(dpo("sigmoid_norm", 0.5, pc=pc, pr=pr, rc=rc, rr=rr), want)


def test_hinge_exo_nca_sppo_apo():
    beta = 0.4
    rows = list(zip(PC, PR, RC, RR))
    # SLiC (Zhao et al. 2023): max(0, delta - beta h), delta = 1
    close(dpo("hinge", beta), [max(0.0, 1 - beta * ((a - c) - (b - d))) for a, b, c, d in rows])
    # EXO pairwise (Ji et al. 2024): KL(p_theta || p_target), p_theta = softmax(beta r_c, beta r_r), target (1-e, e)
    e = 1e-3
    want = []
    for a, b, c, d in rows:
        p1 = math.exp(beta * (a - c)) / (math.exp(beta * (a - c)) + math.exp(beta * (b - d)))
        want.append(p1 * math.log(p1 / (1 - e)) + (1 - p1) * math.log((1 - p1) / e))
    close(dpo("exo_pair", beta), want)
    # NCA, K = 2 (Chen et al. 2024): -log sigma(r_c) - 1/2 sum_{y in {c, r}} log sigma(-r_y), r = beta log ratio
    close(dpo("nca_pair", beta), [-lsig(beta * (a - c)) - 0.5 * lsig(-beta * (a - c)) - 0.5 * lsig(-beta * (b - d))
                                  for a, b, c, d in rows])
    # SPPO (Wu et al. 2024): (log ratio - eta (P - 1/2))^2 per reply, eta = 1/beta, P = 1 and 0
    close(dpo("sppo_hard", beta), [((a - c) - 0.5 / beta) ** 2 + ((b - d) + 0.5 / beta) ** 2 for a, b, c, d in rows])
    # APO (D'Oosterlinck et al. 2024): zero = 1 - sigma(beta a) + sigma(beta b); down = sigma(beta a) + 1 - sigma(beta h)
    close(dpo("apo_zero", beta), [1 - sig(beta * (a - c)) + sig(beta * (b - d)) for a, b, c, d in rows])
    close(dpo("apo_down", beta), [sig(beta * (a - c)) + 1 - sig(beta * ((a - c) - (b - d))) for a, b, c, d in rows])


def test_bco_aot_discopop():
    beta, delta = 0.3, 0.07
    rows = list(zip(PC, PR, RC, RR))
    # BCO (Jung et al. 2024, eq. 9 with the reward shift delta): -log sigma(r_c - delta) - log sigma(delta - r_r)
    close(dpo("bco_pair", beta, bco_delta=delta),
          [-lsig(beta * (a - c) - delta) - lsig(delta - beta * (b - d)) for a, b, c, d in rows])
    # AOT (Melnyk et al. 2024), paired: sorted policy margins against sorted reference margins, logistic penalty
    pol = sorted(a - b for a, b in zip(PC, PR))
    ref = sorted(c - d for c, d in zip(RC, RR))
    close(dpo("aot", beta), [-lsig(beta * (x - y)) for x, y in zip(pol, ref)])
    # unpaired: sorted chosen log-ratios against sorted rejected log-ratios
    chosen = sorted(a - c for a, c in zip(PC, RC))
    rejected = sorted(b - d for b, d in zip(PR, RR))
    close(dpo("aot_pair", beta), [-lsig(beta * (x - y)) for x, y in zip(chosen, rejected)])
    # DiscoPOP / LRML (Lu et al. 2024): (1 - sigma(rho/tau)) (-log sigma(rho)) + sigma(rho/tau) e^{-rho}, rho = beta h
    tau = 0.05
    want = []
    for a, b, c, d in rows:
        rho = beta * ((a - c) - (b - d))
        s = sig(rho / tau)
        want.append((1 - s) * -lsig(rho) + s * math.exp(-rho))
    close(dpo("discopop", beta, discopop_tau=tau), want)


def test_ld_dpo_log_likelihood():
    # LD-DPO (Liu et al. 2024, eq. 9): log p(y) = sum_{t <= l_p} log p_t + alpha sum_{t > l_p} log p_t
    from lmforge.rlhf.scoring import TokenLogps, ld_weights

    chosen = [[-0.5, -1.0, -0.25], [-2.0]]
    rejected = [[-1.5], [-0.1, -0.2, -0.3, -0.4]]
    alpha = 0.3
    seqs = chosen + rejected
    values = T([v for s in seqs for v in s])
    seq = T([i for i, s in enumerate(seqs) for _ in s])
    tok = TokenLogps(values, seq, 4)
    want = []
    for k, s in enumerate(seqs):
        other = seqs[(k + 2) % 4]
        lp = min(len(s), len(other))
        want.append(sum(s[:lp]) + alpha * sum(s[lp:]))
    close(tok.scores(ld_weights(tok, 2, alpha)).sums, want)


# ----------------------------------------------------------------------------- reference-free and unpaired


def test_cpo_simpo_orpo():
    beta = 0.1
    # CPO (Xu et al. 2024, eq. 3's preference term): -log sigma(beta log pi_c - beta log pi_r)
    close(L.cpo_loss(T(PC), T(PR), beta=beta).losses, [-lsig(beta * (a - b)) for a, b in zip(PC, PR)])
    # SimPO (Meng et al. 2024, eq. 6): -log sigma(beta/|y_c| log pi_c - beta/|y_r| log pi_r - gamma)
    ac, ar = [p / n for p, n in zip(PC, NC)], [p / n for p, n in zip(PR, NR)]
    close(L.simpo_loss(T(ac), T(ar), beta=2.0, gamma=0.5).losses,
          [-lsig(2.0 * (a - b) - 0.5) for a, b in zip(ac, ar)])
    # ORPO (Hong et al. 2024, eqs. 4-7): odds(y) = P / (1 - P), P = exp(mean log-likelihood); lambda x -log sigma(log OR)
    want = []
    for a, b in zip(ac, ar):
        pa, pb = math.exp(a), math.exp(b)
        want.append(-0.2 * lsig(math.log(pa / (1 - pa)) - math.log(pb / (1 - pb))))
    close(L.orpo_loss(T(ac), T(ar), beta=0.2).losses, want)


def test_cpo_ipo_issue_numbers():
    """Issue #18: CPO-ipo gave 470.3 on sums where the length-averaged 35.7 is right (beta 0.1, target 5)."""
    sums = L.cpo_loss(T([-27.96875]), T([-54.65475]), beta=0.1, loss_type="ipo").losses.item()
    avgs = L.cpo_loss(T([-27.96875 / 10]), T([-54.65475 / 30]), beta=0.1, loss_type="ipo").losses.item()
    assert (round(sums, 1), round(avgs, 1)) == (470.3, 35.7)
    assert (-27.96875 + 54.65475 - 5) ** 2 == pytest.approx(sums, rel=1e-5)


def test_kto_with_reference_point():
    # KTO (Ethayarajh et al. 2024): z0 = max(0, mean KL estimate over mismatched pairs);
    # loss = lambda_D (1 - sigma(beta (r - z0))) desirable, lambda_U (1 - sigma(beta (z0 - r))) undesirable
    kl_policy, kl_ref = [-4.0, -6.0, -2.0], [-4.5, -5.8, -2.1]
    z0 = max(0.0, sum(p - r for p, r in zip(kl_policy, kl_ref)) / 3)
    assert L.kto_kl_estimate(T(kl_policy), T(kl_ref)).item() == pytest.approx(z0)
    beta, lam_d, lam_u = 0.3, 1.0, 1.5
    labels = [True, False, True, False, True]
    want = [lam_d * (1 - sig(beta * ((a - c) - z0))) if y else lam_u * (1 - sig(beta * (z0 - (a - c))))
            for a, c, y in zip(PC, RC, labels)]
    losses, _ = L.kto_loss(T(PC), T(RC), T(labels), z0, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    close(losses, want)


def test_bradley_terry():
    # InstructGPT eq. 1 with Llama 2's margin: -log sigma(r_c - r_r - m) (+ c (r_c + r_r)^2)
    rc, rr, m = [1.0, -0.5, 2.0], [0.5, 0.5, -1.0], [0.0, 1.0, 0.5]
    want = [-lsig(a - b - k) + 0.01 * (a + b) ** 2 for a, b, k in zip(rc, rr, m)]
    close(L.bradley_terry_loss(T(rc), T(rr), T(m), center_rewards_coefficient=0.01), want)


# ----------------------------------------------------------------------------- GRPO family

REWARDS = [1.0, 0.0, float("nan"), 1.0, 0.5, 0.5, 0.2, 0.9]


def ref_advantages(rewards, G_, scale="group", eps=1e-4):
    """DeepSeekMath eq. 4 (outcome supervision): A_i = (r_i - mean(r)) / std(r) in the group, std unbiased; an
    unscored reply is in neither and gets 0 (issue #18)."""
    out = []
    for g in range(0, len(rewards), G_):
        grp = [r for r in rewards[g:g + G_] if not math.isnan(r)]
        mean = sum(grp) / len(grp) if grp else 0.0
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (len(grp) - 1)) if len(grp) > 1 else 0.0
        for r in rewards[g:g + G_]:
            out.append(0.0 if math.isnan(r) else (r - mean) / ((std + eps) if scale == "group" else 1.0))
    return out


def test_group_advantages_against_the_formula():
    close(G.group_advantages(T(REWARDS), 4, "group"), ref_advantages(REWARDS, 4))
    close(G.group_advantages(T(REWARDS), 4, "none"), ref_advantages(REWARDS, 4, "none"))


LOGP = [[-1.0, -0.5, -2.0], [-0.2, -3.0, -1.0]]
OLD = [[-1.2, -0.4, -2.0], [-0.5, -2.5, -1.1]]
REF = [[-1.1, -0.6, -1.5], [-0.3, -2.8, -1.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [0.8, -1.3]


def _tokens():
    for i in range(2):
        for t in range(3):
            if MASK[i][t]:
                yield i, t, LOGP[i][t], OLD[i][t], REF[i][t], ADV[i]


def _per_sequence_mean(values):
    return sum(sum(v for (i, _), v in values.items() if i == s) / sum(MASK[s]) for s in range(2)) / 2


def _grpo(**kw):
    return G.grpo_token_loss(T(LOGP), T(OLD), T(ADV), T(MASK, dtype=torch.float32), **kw).loss.item()


def test_clipped_objective_k3_and_aggregations():
    # DeepSeekMath eq. 3: -(1/G) sum_i (1/|o_i|) sum_t [min(rho A, clip(rho, 1-e, 1+e) A) - beta D_KL],
    # D_KL = pi_ref/pi - log(pi_ref/pi) - 1 (k3)
    eps_lo, eps_hi, beta = 0.2, 0.28, 0.05
    per = {}
    for i, t, lp, old, ref, a in _tokens():
        rho = math.exp(lp - old)
        kl = math.exp(ref - lp) - (ref - lp) - 1
        per[(i, t)] = -min(rho * a, min(max(rho, 1 - eps_lo), 1 + eps_hi) * a) + beta * kl
    kw = dict(epsilon_low=eps_lo, epsilon_high=eps_hi, beta=beta, ref_logps=T(REF))
    assert _grpo(**kw) == pytest.approx(_per_sequence_mean(per), rel=1e-5)
    # DAPO eq. 8: one sum over every token of the batch / their number; Dr. GRPO: sum / (G x max length)
    assert _grpo(loss_type="bnpo", **kw) == pytest.approx(sum(per.values()) / len(per), rel=1e-5)
    assert _grpo(loss_type="dapo", normalizer=9.0, **kw) == pytest.approx(sum(per.values()) / 9.0, rel=1e-5)
    assert _grpo(loss_type="dr_grpo", max_completion_length=8, **kw) == pytest.approx(sum(per.values()) / 16,
                                                                                     rel=1e-5)
    # two-sided clipping (INTELLECT-2): the unclipped ratio is capped at delta where it would be used
    per2 = {(i, t): -min(min(math.exp(lp - old), 1.1) * a, min(max(math.exp(lp - old), 0.8), 1.2) * a)
            for i, t, lp, old, _, a in _tokens()}
    assert _grpo(delta=1.1) == pytest.approx(_per_sequence_mean(per2), rel=1e-5)


def test_gspo_cispo_sapo():
    # GSPO (Zheng et al. 2025, eq. 5-7): s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|), -min(s_i A_i, clip(s_i) A_i)
    eps = 0.2
    seq = {}
    for s in range(2):
        toks = [(lp, old) for i, t, lp, old, _, _ in _tokens() if i == s]
        ratio = math.exp(sum(lp for lp, _ in toks) - sum(old for _, old in toks)) ** (1 / len(toks))
        seq[s] = -min(ratio * ADV[s], min(max(ratio, 1 - eps), 1 + eps) * ADV[s])
    assert _grpo(importance_sampling_level="sequence") == pytest.approx(sum(seq.values()) / 2, rel=1e-5)
    # CISPO (MiniMax-M1, eq. 4): -(1/sum|o_i|) sum sg(clip(r, 1 - e_low^IS, 1 + e_high^IS)) A log pi, no lower bound
    per = {(i, t): -min(math.exp(lp - old), 1 + 2.0) * a * lp for i, t, lp, old, _, a in _tokens()}
    assert _grpo(loss_type="cispo", epsilon_high=2.0, normalizer=5.0) == pytest.approx(sum(per.values()) / 5,
                                                                                      rel=1e-5)
    # SAPO: f(r) = sigma(tau (r - 1)) 4 / tau, tau = tau_pos for A > 0 and tau_neg for A < 0; -(1/G) sum (1/|o|) sum f A
    per = {}
    for i, t, lp, old, _, a in _tokens():
        tau = 1.0 if a > 0 else 1.05
        per[(i, t)] = -sig(tau * (math.exp(lp - old) - 1)) * 4 / tau * a
    assert _grpo(loss_type="sapo") == pytest.approx(_per_sequence_mean(per), rel=1e-5)


def test_gkd_generalized_jsd():
    # GKD (Agarwal et al. 2024, eq. 3): JSD(b)(P||Q) = b KL(P || bP + (1-b)Q) + (1-b) KL(Q || bP + (1-b)Q)
    teacher = [[0.3, -1.0, 2.0], [0.0, 0.5, -0.5]]
    student = [[1.0, 0.2, -0.3], [-1.0, 0.0, 1.5]]

    def softmax(x, temp):
        e = [math.exp(v / temp) for v in x]
        return [v / sum(e) for v in e]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for temp in (1.0, 0.7):
            want = []
            for tl, sl in zip(teacher, student):
                p, q = softmax(tl, temp), softmax(sl, temp)
                if beta == 0.0:
                    want.append(kl(p, q))
                elif beta == 1.0:
                    want.append(kl(q, p))
                else:
                    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
                    want.append(beta * kl(p, m) + (1 - beta) * kl(q, m))
            close(generalized_jsd(T(student), T(teacher), beta, temp), want)


def test_tr_dpo_soft_update():
    # TR-DPO (Gorbatovski et al. 2024, eq. 5): theta_ref <- alpha theta + (1 - alpha) theta_ref
    from lmforge.rlhf.trainer import mix_reference

    ref = torch.nn.Linear(3, 1, bias=False)
    start = [0.5, -1.0, 2.0]
    policy = [1.5, 1.0, -2.0]
    with torch.no_grad():
        ref.weight.copy_(T([start]))
    mix_reference(ref, [("weight", T([policy]))], 0.6)
    close(ref.weight[0], [0.6 * p + 0.4 * s for p, s in zip(policy, start)])
