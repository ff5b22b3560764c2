"""The GRPO family's options as pure functions, on numbers worked out by hand (arithmetic beside each).

Covers issue #18's GRPO items: unscored completions (advantage 0, out of the group statistics), the
global batch std, GSPO's sequence ratio, dapo's step-level token normaliser, cispo, sapo, two-sided
clipping (delta), truncated-completion masking, entropy token selection, off-policy sequence masking
and the two reward aggregations.
"""
from __future__ import annotations

import math

import pytest
import torch

from lmforge.rlhf import grpo as G

NAN = float("nan")


# ----------------------------------------------------------------------------- unscored completions


def test_unscored_completion_gets_zero_advantage_and_leaves_the_group_statistics():
    # rewards [1, 0, unscored, 1]: the scored ones are [1, 0, 1], mean 2/3, deviations [1/3, -2/3, 1/3],
    # unbiased var (1/9 + 4/9 + 1/9) / 2 = 1/3, std 0.5773503 -> A = [1/3, -2/3, 1/3] / 0.5774503
    a = G.group_advantages(torch.tensor([1.0, 0.0, NAN, 1.0]), 4, "group")
    assert a.tolist() == pytest.approx([0.5772503, -1.1545006, 0.0, 0.5772503], abs=1e-6)
    # before the fix the unscored reply counted as reward 0: [1, 0, 0, 1] -> A = -0.8658754 for it
    # a group with one scored reply or none carries no signal
    assert G.group_advantages(torch.tensor([NAN, 3.0, NAN, NAN]), 4, "group").tolist() == [0.0] * 4
    assert G.group_advantages(torch.tensor([NAN] * 4), 4, "none").tolist() == [0.0] * 4
    assert G.zero_std_groups(torch.tensor([1.0, NAN, 1.0, 1.0, 0.0, NAN, 1.0, NAN]), 4).tolist() == [True, False]
    assert G.scored(torch.tensor([1.0, NAN])).tolist() == [True, False]


def test_weighted_rewards_mark_a_completion_no_function_scored():
    from lmforge.rlhf.rewards import weighted_rewards

    table = torch.tensor([[1.0, NAN], [NAN, NAN], [0.0, 2.0]])
    total = weighted_rewards(table, [1.0, 0.5])
    assert total[0].item() == 1.0 and math.isnan(total[1].item()) and total[2].item() == 1.0


def test_batch_std_from_sums_over_processes():
    # local [1, 2, unscored, 4]: sum 7, squares 21, n 3 -> sqrt((21 - 49/3) / 2) = 1.5275252
    local = G.BatchStd.local(torch.tensor([1.0, 2.0, NAN, 4.0]))
    assert local.tolist() == [7.0, 21.0, 3.0] and G.BatchStd(*local.tolist()).std() == pytest.approx(1.5275252)
    # another process's [3] added: sum 10, squares 30, n 4 -> sqrt((30 - 25) / 3) = 1.2909944
    both = local + G.BatchStd.local(torch.tensor([3.0]))
    assert G.BatchStd(*both.tolist()).std() == pytest.approx(1.2909944)
    assert G.BatchStd(5.0, 25.0, 1.0).std() == 0.0


# ----------------------------------------------------------------------------- reward aggregation


def test_sum_versus_normalize_then_sum():
    # two rewards, weights [1, 0.5]; group 1: r1 = [1, 10], r2 = [0, 30]; group 2: [1, unscored], [1, 20]
    table = torch.tensor([[1.0, 10.0], [0.0, 30.0], [1.0, NAN], [1.0, 20.0]])
    w = torch.tensor([1.0, 0.5])
    # sum: totals [6, 15 | 1, 11]; group stds sqrt(40.5) = 6.3639610 and sqrt(50) = 7.0710678
    # -> A = [-4.5, 4.5] / 6.3640610 = -+0.7070957 and [-5, 5] / 7.0711678 = -+0.7070968
    a = G.reward_advantages(table, w, 2, "group", "sum")
    assert a.tolist() == pytest.approx([-0.7070957, 0.7070957, -0.7070968, 0.7070968], abs=1e-6)
    # normalize_then_sum: reward 1's group advantages [0.5, -0.5] / (0.7071068 + 1e-4) = +-0.7070068, then [0, 0];
    # reward 2's [-10, 10] / (14.1421356 + 1e-4) = -+0.7071018, then [unscored, one value] = [0, 0]
    # -> [0.7070068 - 0.5 x 0.7071018, -0.7070068 + 0.5 x 0.7071018, 0, 0]: the weight-1 reward decides
    a = G.reward_advantages(table, w, 2, "group", "normalize_then_sum")
    assert a.tolist() == pytest.approx([0.3534559, -0.3534559, 0.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="reward_aggregation"):
        G.reward_advantages(table, w, 2, "group", "product")


# ----------------------------------------------------------------------------- objectives


def _one(ratio: float, adv: float, **kw):
    logps = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out = G.grpo_token_loss(logps, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), **kw)
    out.loss.backward()
    return out.loss.item(), logps.grad.item()


def test_gspo_sequence_ratio():
    # log-ratios [0.2, -0.1] (a third, padded position ignored): sequence ratio exp(0.05) = 1.0512711
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logps = torch.tensor([[0.2, -0.1, 5.0]], requires_grad=True)
    out = G.grpo_token_loss(logps, old, torch.tensor([1.0]), mask, importance_sampling_level="sequence")
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1.0512711, abs=1e-6)
    # d(-s)/d logp_t = -s / |o| = -0.5256355 for both trained tokens, 0 for the pad
    assert logps.grad[0].tolist() == pytest.approx([-0.5256355, -0.5256355, 0.0], abs=1e-6)
    # token level instead: ratios [1.2214028 -> clipped 1.2, 0.9048374]: mean of [-1.2, -0.9048374] = -1.0524187
    tok = G.grpo_token_loss(logps.detach(), old, torch.tensor([1.0]), mask)
    assert tok.loss.item() == pytest.approx(-1.0524187, abs=1e-6)
    # GSPO's small clip range: 1.0512711 > 1 + 4e-4, clipped: -1.0004 and no gradient
    out = G.grpo_token_loss(logps, old, torch.tensor([1.0]), mask, epsilon_low=3e-4, epsilon_high=4e-4,
                            importance_sampling_level="sequence")
    assert out.loss.item() == pytest.approx(-1.0004) and out.high_clipped[0, :2].all()


def test_dapo_divides_by_the_steps_token_count():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # 10 over the 20 tokens of the whole step = 0.5; without the step's count, the micro-batch's 4 (= bnpo)
    assert G.aggregate_loss(per_token, mask, "dapo", normalizer=20.0).item() == pytest.approx(0.5)
    assert G.aggregate_loss(per_token, mask, "dapo").item() == pytest.approx(2.5)
    assert G.aggregate_loss(per_token, mask, "sapo").item() == pytest.approx(3.0)  # per-sequence, as grpo


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    # ratio 1.5, A = 1, eps_high 0.2: weight sg(min(1.5, 1.2)) = 1.2 -> loss -1.2 log 1.5 = -0.4865581, grad -1.2
    assert _one(1.5, 1.0, loss_type="cispo") == pytest.approx((-0.4865581, -1.2), abs=1e-6)
    # the clipped PPO objective gives that token no gradient at all
    assert _one(1.5, 1.0)[1] == 0.0
    # ratio 0.5, A = -1: weight 0.5 -> loss 0.5 log 0.5 = -0.3465736, grad 0.5
    assert _one(0.5, -1.0, loss_type="cispo") == pytest.approx((-0.3465736, 0.5), abs=1e-6)


def test_sapo_soft_gate():
    # A = 1, tau_pos 1, ratio 1.5: loss -4 sigma(0.5) = -2.4898373; grad -4 sigma (1 - sigma) x ratio = -1.4100223
    assert _one(1.5, 1.0, loss_type="sapo") == pytest.approx((-2.4898373, -1.4100223), abs=1e-6)
    # A = -1, tau_neg 1.05: loss +(4 / 1.05) sigma(0.525) = 2.3935855; grad 4 sigma (1 - sigma) x 1.5 = 1.4012097
    assert _one(1.5, -1.0, loss_type="sapo") == pytest.approx((2.3935855, 1.4012097), abs=1e-6)
    # at ratio 1 the gradient is the plain policy gradient -A
    assert _one(1.0, 2.0, loss_type="sapo")[1] == pytest.approx(-2.0)


def test_two_sided_clipping_caps_negative_advantages():
    # ratio 5, A = -1: min(5 x -1, 1.2 x -1) = -5 -> loss 5 (gradient 5); with delta 3: min(-3, -1.2) = -3,
    # loss 3 and no gradient through the cap
    assert _one(5.0, -1.0) == pytest.approx((5.0, 5.0))
    assert _one(5.0, -1.0, delta=3.0) == pytest.approx((3.0, 0.0))
    # a positive advantage is bounded by the clip already: delta changes nothing
    assert _one(5.0, 1.0, delta=3.0) == pytest.approx(_one(5.0, 1.0))


# ----------------------------------------------------------------------------- token selection


def test_truncated_completions_do_not_train():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert G.truncated_mask(mask, torch.tensor([False, True])).tolist() == [[1, 1, 0], [0, 0, 0]]


def test_entropy_selection():
    # uniform over 4: log 4 = 1.3862944; logits [10, 0, 0, 0]: p = e^10 / (e^10 + 3), H = 0.0014980
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]]])
    assert G.token_entropy(logits)[0].tolist() == pytest.approx([1.3862944, 0.0014980], abs=1e-6)
    ent = torch.tensor([0.1, 0.5, 0.9, 1.3])
    # top half: the 0.5 quantile of 4 values, between 0.5 and 0.9 -> 0.7; top quarter: 0.9 + 0.25 x 0.4 = 1.0
    assert G.entropy_threshold(ent, 0.5) == pytest.approx(0.7) and G.entropy_threshold(ent, 0.25) == pytest.approx(1.0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    kept = G.entropy_mask(ent[None], mask, 0.7)
    assert kept.tolist() == [[0.0, 0.0, 1.0, 0.0]]  # 1.3 is above but not a trained token
    # the policy term of unselected tokens vanishes; the average still runs over all trained tokens
    logps = torch.zeros(1, 4, requires_grad=True)
    out = G.grpo_token_loss(logps, logps.detach(), torch.tensor([1.0]), mask, pg_mask=kept)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1 / 3) and logps.grad[0].tolist() == pytest.approx([0, 0, -1 / 3, 0])


def test_off_policy_sequence_mask():
    # mean log(pi_old / pi) = -0.5 - (-1) = 0.5 for both; only the negative-advantage one past the threshold goes
    logps, old = torch.full((2, 2), -1.0), torch.full((2, 2), -0.5)
    mask, adv = torch.ones(2, 2), torch.tensor([-1.0, 1.0])
    assert G.off_policy_sequence_mask(logps, old, adv, mask, 0.4).tolist() == [False, True]
    assert G.off_policy_sequence_mask(logps, old, adv, mask, 0.6).tolist() == [True, True]


# ----------------------------------------------------------------------------- in the trainer


def _args(tmp_path, **kw):
    from test_grpo import _grpo_args

    return _grpo_args(tmp_path, **{**dict(reward_funcs=["scripted"], per_device_train_batch_size=2, max_steps=2), **kw})


def _script(engine, request, k):
    """Samples 0 and 3 say 7 (reward 1; sample 0 runs to the length limit), sample 1 says 3 (reward 0), sample 2
    says x (no reward function scores it)."""
    return [("77777", "length"), "3", "x", "7"][k]


@pytest.fixture(scope="module")
def scripted():
    from lmforge.model import get_model_tokenizer
    from lmforge.registry import REWARDS
    from test_grpo_support import ScriptedEngine

    if "scripted" not in REWARDS:
        REWARDS.register("scripted", lambda completions, **kw: [
            None if c == "x" else float(c.startswith("7")) for c in completions])
    tok = get_model_tokenizer("builtin:tiny", load_model=False)[1]
    return lambda: ScriptedEngine(tok, _script)


def test_unscored_and_truncated_completions_in_a_run(tmp_path, scripted):
    from lmforge.pipelines.rlhf import grpo_main

    result = grpo_main(_args(tmp_path, mask_truncated_completions=True, max_steps=1), engine=scripted())
    log = [h for h in result["log_history"] if "loss" in h][0]
    assert log["completions/unscored_ratio"] == 0.25  # sample 2 of every group
    batch = result["trainer"]._step_batches[0]
    adv, mask = batch["advantages"].view(-1, 4), batch["completion_mask"].view(2, 4, -1)
    for g in range(2):  # rewards [1, 0, unscored, 1]: mean 2/3 -> A = [0.5772503, -1.1545006, 0, 0.5772503]
        assert adv[g].tolist() == pytest.approx([0.5772503, -1.1545006, 0.0, 0.5772503], abs=1e-5)
        assert mask[g, 0].sum() == 0 and (mask[g, 1:].sum(-1) > 0).all()  # only the truncated sample is masked
    assert log["completions/clipped_ratio"] == 0.25


def test_dapo_normaliser_counts_the_whole_step(tmp_path, scripted):
    from lmforge.pipelines.rlhf import grpo_main

    result = grpo_main(_args(tmp_path, grpo_loss_type="dapo", gradient_accumulation_steps=2, max_steps=1,
                             learning_rate=0.0), engine=scripted())
    trainer = result["trainer"]
    assert trainer.loss_is_scaled_for_ga  # dapo divides by the step's tokens itself
    rows = [trainer.train_dataset[i] for i in range(4)]
    trainer.model.train()
    batches, n = trainer.get_batch_samples(iter([rows[:2], rows[2:]]), 2, trainer.args.device)
    masks = [b["completion_mask"] for b in batches]
    assert n.item() == sum(m.sum().item() for m in masks)  # one process: the step's trained tokens
    # on-policy (ratio 1) the token loss is -A: the micro-batch losses add up to the mean over the step's tokens
    total = sum(trainer.compute_loss(trainer.model, b, num_items_in_batch=n).item() for b in batches)
    want = -sum((b["advantages"][:, None] * m).sum().item() for b, m in zip(batches, masks)) / n.item()
    assert total == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("extra", [dict(grpo_loss_type="cispo", epsilon_high=4.0),
                                   dict(grpo_loss_type="sapo"),
                                   dict(importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
                                   dict(top_entropy_quantile=0.5, delta=2.0, num_iterations=2,
                                        off_policy_mask_threshold=0.0, reward_aggregation="normalize_then_sum",
                                        scale_rewards="batch")])
def test_variants_train(tmp_path, scripted, extra):
    from lmforge.pipelines.rlhf import grpo_main

    result = grpo_main(_args(tmp_path, **extra), engine=scripted())
    logs = [h for h in result["log_history"] if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    if "top_entropy_quantile" in extra:
        assert 0.3 <= logs[0]["entropy/threshold_frac_kept"] <= 0.7
        assert "off_policy/masked_ratio" in logs[1]  # the reused step has a sampling policy to compare with


def test_async_rollouts_lag_one_step(tmp_path, scripted):
    """Step k trains on samples drawn (in the background) with the weights pushed after step k-2's update, i.e.
    one optimizer step old; their old log-probs are the engine's, which the clipped ratio corrects for."""
    from lmforge.pipelines.rlhf import grpo_main

    engine = scripted()
    result = grpo_main(_args(tmp_path, async_generate=True, max_steps=3), engine=engine)
    # call 1 (step 0, in the training thread) after the first push; call k + 1 (for step k) in the background,
    # after k pushes: the weights of the end of step k - 1
    assert engine.calls[0] == ("MainThread", 1)
    assert engine.calls[1:] == [("lmforge-async-rollouts", k) for k in range(1, len(engine.calls))]
    assert len(engine.calls) == 4  # steps 0, 1, 2 and the one started for a step 3 that never came
    batch = result["trainer"]._step_batches[0]
    on = batch["completion_mask"] > 0
    assert torch.all(batch["old_logps"][on] == -0.5)
    assert result["trainer"]._pending is None  # the unused background rollout was waited for


def test_async_hf_engine_gets_a_copy(tmp_path):
    from lmforge.pipelines.rlhf import rlhf_main

    result = rlhf_main(_args(tmp_path, reward_funcs=["accuracy"], async_generate=True, max_steps=2,
                             learning_rate=1e-2))
    trainer = result["trainer"]
    engine = trainer._engine
    assert engine.model is not trainer.model and not trainer._colocated
    pushed = dict(engine.model.named_parameters())
    # the copy got the weights of the policy as it was at the last push (after step 1's update, before step 2's)
    assert set(pushed) == {n for n, _ in trainer.model.named_parameters()}
    with pytest.raises(Exception, match="temperature 1"):
        _args(tmp_path, async_generate=True, temperature=0.7)


def test_grpo_sync_ref_model(tmp_path, scripted):
    from lmforge.pipelines.rlhf import grpo_main

    result = grpo_main(_args(tmp_path, beta=0.05, sync_ref_model=True, ref_model_mixup_alpha=1.0,
                             ref_model_sync_steps=1, learning_rate=1e-2), engine=scripted())
    trainer = result["trainer"]
    ref = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(ref[n], p) for n, p in trainer.model.named_parameters())


def test_vllm_backend_is_not_offered():
    from lmforge.arguments import InferArguments, parse_args
    from lmforge.infer import get_engine

    with pytest.raises(SystemExit):
        parse_args(InferArguments, ["--model", "m", "--infer_backend", "vllm"])
    with pytest.raises(ValueError, match="expected hf or native"):
        get_engine("vllm")
