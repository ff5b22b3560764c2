"""Each preference loss against its paper's formula, worked out by hand on fixed log-probs.

Two pairs are used throughout (beta = 0.5 unless noted):

    pair 1: pi_c = -5.0, pi_r = -7.0, ref_c = -6.0, ref_r = -6.5  ->  a = 1.0,  b = -0.5, h = 1.5,  beta h = 0.75
    pair 2: pi_c = -3.0, pi_r = -2.0, ref_c = -2.5, ref_r = -2.5  ->  a = -0.5, b = 0.5,  h = -1.0, beta h = -0.5

where a = pi_c - ref_c, b = pi_r - ref_r, h = a - b. The expected numbers below are written out
from the formulas with the arithmetic shown, not computed by the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch

from lmforge.rlhf import losses as L

PC, PR = torch.tensor([-5.0, -3.0]), torch.tensor([-7.0, -2.0])
RC, RR = torch.tensor([-6.0, -2.5]), torch.tensor([-6.5, -2.5])
BETA = 0.5


def softplus(x: float) -> float:  # -log sigma(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def dpo(loss_type: str, eps: float = 0.0) -> list[float]:
    return L.dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type=loss_type, label_smoothing=eps).losses.tolist()


def test_dpo_sigmoid():
    # -log sigma(beta h) = log(1 + e^{-beta h}): log(1 + e^{-0.75}) = log(1.4723666) ; log(1 + e^{0.5}) = log(2.6487213)
    assert dpo("sigmoid") == pytest.approx([0.3868710061, 0.9740769842], abs=1e-6)
    out = L.dpo_loss(PC, PR, RC, RR, beta=BETA)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, -0.25])    # beta * a
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.25])  # beta * b


def test_dpo_conservative_label_smoothing():
    # -(1 - eps) log sigma(z) - eps log sigma(-z), eps = 0.1:
    # pair 1: 0.9 * 0.3868710 + 0.1 * log(1 + e^{0.75}) = 0.3481839 + 0.1 * 1.1368710 = 0.4618710
    # pair 2: 0.9 * 0.9740770 + 0.1 * log(1 + e^{-0.5}) = 0.8766693 + 0.1 * 0.4740770 = 0.9240770
    assert dpo("sigmoid", 0.1) == pytest.approx([0.4618710061, 0.9240769842], abs=1e-6)


def test_dpo_robust():
    # [-(1 - eps) log sigma(z) + eps log sigma(-z)] / (1 - 2 eps), eps = 0.1:
    # pair 1: (0.3481839 - 0.1136871) / 0.8 = 0.2931210 ; pair 2: (0.8766693 - 0.0474077) / 0.8 = 1.0365770
    assert dpo("robust", 0.1) == pytest.approx([0.2931210061, 1.0365769842], abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        dpo("robust", 0.5)


def test_dpo_hinge_and_ipo():
    # hinge: max(0, 1 - beta h) = [1 - 0.75, 1 + 0.5]
    assert dpo("hinge") == pytest.approx([0.25, 1.5])
    # ipo: (h - 1/(2 beta))^2 = [(1.5 - 1)^2, (-1 - 1)^2]
    assert dpo("ipo") == pytest.approx([0.25, 4.0])


def test_dpo_exo_pair():
    # p = sigma(z); sum_i p_i (log p_i - log q_i), q = (1 - 1e-3, 1e-3)
    eps = 1e-3
    want = [sigmoid(z) * (math.log(sigmoid(z)) - math.log(1 - eps))
            + sigmoid(-z) * (math.log(sigmoid(-z)) - math.log(eps)) for z in (0.75, -0.5)]
    assert want == pytest.approx([1.5893475712, 3.6373271420], abs=1e-6)
    assert dpo("exo_pair") == pytest.approx(want, abs=1e-5)


def test_dpo_nca_pair():
    # -log sigma(beta a) - 0.5 log sigma(-beta a) - 0.5 log sigma(-beta b)
    # pair 1: log(1+e^-0.5) + 0.5 log(1+e^0.5) + 0.5 log(1+e^-0.25) = 0.4740770 + 0.4870385 + 0.2879697 = 1.2490852
    assert dpo("nca_pair") == pytest.approx([1.2490851862, 1.5268788398], abs=1e-6)


def test_dpo_sppo_hard():
    # (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2 = [(1 - 1)^2 + (-0.5 + 1)^2, (-0.5 - 1)^2 + (0.5 + 1)^2]
    assert dpo("sppo_hard") == pytest.approx([0.25, 4.5])


def test_dpo_apo():
    # zero: 1 - sigma(beta a) + sigma(beta b) ; down: sigma(beta a) + 1 - sigma(beta h)
    # pair 1: 1 - sigma(0.5) + sigma(-0.25) = 1 - 0.6224593 + 0.4378235 = 0.8153642
    #         sigma(0.5) + 1 - sigma(0.75)  = 0.6224593 + 1 - 0.6791787 = 0.9432806
    assert dpo("apo_zero") == pytest.approx([0.8153641679, 1.1243530018], abs=1e-6)
    assert dpo("apo_down") == pytest.approx([0.9432806320, 1.0602828303], abs=1e-6)


def test_dpo_unknown_variant():
    with pytest.raises(ValueError, match="sigmoid"):
        dpo("nope")
    assert set(L.DPO_LOSS_TYPES) >= {"sigmoid", "ipo", "hinge", "robust"}


def test_dpo_loss_types_match_the_arguments_list():
    from lmforge.arguments.rlhf import AVERAGED_LOSS_TYPES, CPO_LOSS_TYPES, DPO_LOSS_TYPES, GRPO_LOSS_TYPES
    from lmforge.rlhf.grpo import GRPO_LOSS_TYPES as GRPO_TYPES

    assert DPO_LOSS_TYPES == L.DPO_LOSS_TYPES and CPO_LOSS_TYPES == L.CPO_LOSS_TYPES
    assert AVERAGED_LOSS_TYPES == L.AVERAGED_LOSS_TYPES and GRPO_LOSS_TYPES == GRPO_TYPES


def test_cpo():
    # -log sigma(beta (pi_c - pi_r)), beta = 0.1, pi_c - pi_r = 2: log(1 + e^{-0.2}) = 0.5981389
    out = L.cpo_loss(torch.tensor([-5.0]), torch.tensor([-7.0]), beta=0.1)
    assert out.losses.tolist() == pytest.approx([0.5981388694], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([-0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.7])
    # hinge: max(0, 1 - 0.1 * 2) = 0.8
    assert L.cpo_loss(torch.tensor([-5.0]), torch.tensor([-7.0]), beta=0.1, loss_type="hinge").losses.item() == \
        pytest.approx(0.8)


def test_simpo():
    # -log sigma(beta (avg_c - avg_r) - gamma) with avg_c = -0.5, avg_r = -1.25, beta = 2, gamma = 1:
    # z = 2 * 0.75 - 1 = 0.5 -> log(1 + e^{-0.5}) = 0.4740770
    out = L.simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.25]), beta=2.0, gamma=1.0)
    assert out.losses.item() == pytest.approx(0.4740769842, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-1.0) and out.rejected_rewards.item() == pytest.approx(-2.5)


def test_orpo():
    # P(y_c) = 0.5 -> odds 1, log odds 0 ; P(y_r) = 0.2 -> odds 0.25, log odds = log 0.25
    # L_OR = -log sigma(0 - log 0.25) = log(1 + 0.25) = 0.2231436 ; times lambda = 0.1
    out = L.orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), beta=0.1)
    assert out.losses.item() == pytest.approx(0.1 * math.log(1.25), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.0223143551, abs=1e-7)


def test_log1mexp_is_stable():
    x = torch.tensor([-1e-8, -0.1, -1.0, -50.0])
    want = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert L.log1mexp(x.double()).tolist() == pytest.approx(want, rel=1e-9)
    assert torch.isfinite(L.log1mexp(torch.tensor([0.0]))).all()


def test_kto():
    # r = pi - ref = [1, -0.5]; z0 = 0.2; beta = 0.5; lambda_D = 1, lambda_U = 2
    # desirable:   1 * (1 - sigma(0.5 * (1 - 0.2)))    = 1 - sigma(0.4)  = 0.4013123
    # undesirable: 2 * (1 - sigma(0.5 * (0.2 + 0.5)))  = 2 (1 - sigma(0.35)) = 0.8267648
    losses, rewards = L.kto_loss(torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -6.5]), torch.tensor([True, False]),
                                 0.2, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    assert losses.tolist() == pytest.approx([0.4013123399, 0.8267648422], abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.25])


def test_kto_kl_estimate():
    # mismatched pairs: (pi - ref) = [0.5, -0.1] -> mean 0.2 ; a negative mean clamps to 0
    z0 = L.kto_kl_estimate(torch.tensor([-4.0, -6.0], requires_grad=True), torch.tensor([-4.5, -5.9]))
    assert z0.item() == pytest.approx(0.2) and not z0.requires_grad
    assert L.kto_kl_estimate(torch.tensor([-5.0]), torch.tensor([-4.0])).item() == 0.0


def test_bradley_terry_with_margin_and_centering():
    rc, rr, m = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0])
    # -log sigma(r_c - r_r - m): diffs [0.5, -1] -> [log(1 + e^-0.5), log(1 + e^1)]
    assert L.bradley_terry_loss(rc, rr).tolist() == pytest.approx([softplus(-1.0), softplus(1.0)])
    assert L.bradley_terry_loss(rc, rr, m).tolist() == pytest.approx([0.4740769842, 1.3132616875], abs=1e-6)
    # + c (r_c + r_r)^2 with c = 0.01: + [0.09, 0.01]
    got = L.bradley_terry_loss(rc, rr, m, center_rewards_coefficient=0.01).tolist()
    assert got == pytest.approx([0.5640769842, 1.3232616875], abs=1e-6)


def test_losses_have_gradients_where_expected():
    pc = PC.clone().requires_grad_()
    L.dpo_loss(pc, PR, RC, RR, beta=BETA).losses.sum().backward()
    # d/d pi_c of -log sigma(beta h) = -beta (1 - sigma(beta h))
    assert pc.grad.tolist() == pytest.approx([-0.5 * (1 - sigmoid(0.75)), -0.5 * (1 - sigmoid(-0.5))], abs=1e-6)


# ----------------------------------------------------------------------------- issue #18 additions


def test_cpo_ipo_on_length_averaged_log_probs():
    """Issue #18: CPO-ipo applied its 1/(2 beta) target to summed log-probs (470.3 where 35.7 was right).

    A chosen reply of 10 tokens summing to -27.96875 (average -2.796875) and a rejected one of 30 tokens summing
    to -54.65475 (average -1.821825), beta = 0.1 (target 5):
    sums:     (-27.96875 + 54.65475 - 5)^2 = 21.686^2      = 470.28
    averages: (-2.796875 + 1.821825 - 5)^2 = (-5.97505)^2 = 35.70
    """
    from lmforge.arguments import RlhfArguments

    args = RlhfArguments(rlhf_type="cpo", loss_type="ipo")
    assert args.averages("ipo") and args.average_log_probs and not RlhfArguments(rlhf_type="cpo").averages()
    summed = L.cpo_loss(torch.tensor([-27.96875]), torch.tensor([-54.65475]), beta=0.1, loss_type="ipo")
    averaged = L.cpo_loss(torch.tensor([-2.796875]), torch.tensor([-1.821825]), beta=0.1, loss_type="ipo")
    assert summed.losses.item() == pytest.approx(470.28, abs=0.01)
    assert averaged.losses.item() == pytest.approx(35.70, abs=0.01)


def test_new_dpo_variants_by_hand():
    # sigmoid_norm is DPO's formula (the trainer averages the log-probs first): as test_dpo_sigmoid
    assert dpo("sigmoid_norm") == pytest.approx([0.3868710061, 0.9740769842], abs=1e-6)
    # bco_pair, delta 0.1: -log sigma(beta a - 0.1) - log sigma(-(beta b - 0.1))
    # pair 1: beta a = 0.5, beta b = -0.25 -> log(1 + e^-0.4) + log(1 + e^-0.35) = 1.0463974
    # pair 2: beta a = -0.25, beta b = 0.25 -> log(1 + e^0.35) + log(1 + e^0.15) = 1.6543392
    out = L.dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="bco_pair", bco_delta=0.1).losses.tolist()
    assert out == pytest.approx([1.0463974078, 1.6543392032], abs=1e-6)
    # aot: sort(pi_c - pi_r) = sort([2, -1]) = [-1, 2]; sort(ref_c - ref_r) = sort([0.5, 0]) = [0, 0.5];
    # differences [-1, 1.5] -> -log sigma(0.5 x .) = [log(1 + e^0.5), log(1 + e^-0.75)]
    assert dpo("aot") == pytest.approx([0.9740769842, 0.3868710061], abs=1e-6)
    # aot_pair: sort(a) = [-0.5, 1], sort(b) = [-0.5, 0.5] -> [0, 0.5] -> [log 2, log(1 + e^-0.25)]
    assert dpo("aot_pair") == pytest.approx([0.6931471806, 0.5759394199], abs=1e-6)
    # discopop, tau 0.05: rho = beta h = [0.75, -0.5], s = sigma(rho / 0.05) = [sigma(15), sigma(-10)]
    # pair 1: (1 - 0.9999997) x 0.3868710 + 0.9999997 x e^-0.75 = 0.4723665
    # pair 2: (1 - 0.0000454) x 0.9740770 + 0.0000454 x e^0.5 = 0.9741076
    assert dpo("discopop") == pytest.approx([0.4723665266, 0.9741076116], abs=1e-6)


def test_ld_dpo_weights():
    """LD-DPO: tokens past the pair's shorter reply count alpha times. Pairs: (2 tokens, 4 tokens), (3, 1)."""
    from lmforge.rlhf.scoring import TokenLogps, ld_weights

    seq = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3])  # chosen 0, 1 then rejected 2, 3; public lengths 2 and 1
    tokens = TokenLogps(torch.full((10,), -1.0), seq, 4)
    w = ld_weights(tokens, 2, 0.25)
    assert w.tolist() == [1, 1, 1, 0.25, 0.25, 1, 1, 0.25, 0.25, 1]
    # sums: [-2, -1 - 0.5, -2 - 0.5, -1]: the excess of each longer reply is damped
    assert tokens.scores(w).sums.tolist() == [-2.0, -1.5, -2.5, -1.0]
    assert tokens.scores().counts.tolist() == [2.0, 3.0, 4.0, 1.0]


def test_tr_dpo_mix_reference():
    from lmforge.rlhf.trainer import mix_reference

    ref = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([[1.0, 3.0]]))
    # alpha 0.25: 0.25 x [5, -1] + 0.75 x [1, 3] = [2, 2]
    assert mix_reference(ref, [("weight", torch.tensor([[5.0, -1.0]]))], 0.25) == 1
    assert ref.weight.tolist() == [[2.0, 2.0]]
    mix_reference(ref, [("weight", torch.tensor([[5.0, -1.0]]))], 1.0)  # hard update: a copy
    assert ref.weight.tolist() == [[5.0, -1.0]]
    with pytest.raises(KeyError, match="no parameter"):
        mix_reference(ref, [("bias", torch.zeros(1))], 0.5)
