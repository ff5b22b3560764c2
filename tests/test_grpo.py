"""GRPO: the formulas on hand-computed tensors, arguments, weight sync, and short training runs on CPU.

Hand-computed numbers (the arithmetic is written out next to each; none comes from the code under test):

    rewards [1, 0, 0, 1 | 2, 2, 2, 2], G = 4
      group 1: mean 0.5, unbiased std sqrt((4 x 0.25) / 3) = 0.5773503 -> A = +-0.5 / 0.5774503 = +-0.8658754
      group 2: all equal -> A = 0
      batch std of all 8: mean 1.25, squares 0.0625 + 1.5625 + 1.5625 + 0.0625 + 4 x 0.5625 = 5.5,
      5.5 / 7 = 0.7857143, sqrt = 0.8864053 -> A = +-0.5 / 0.8865053 = +-0.5640124
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.rlhf import grpo as G

# ----------------------------------------------------------------------------- advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])


def test_group_advantages_scaled_by_group_std():
    a = G.group_advantages(REWARDS, 4, "group")
    assert a.tolist() == pytest.approx([0.8658754, -0.8658754, -0.8658754, 0.8658754, 0, 0, 0, 0], abs=1e-6)


def test_group_advantages_batch_and_none():
    assert G.group_advantages(REWARDS, 4, "none").tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    a = G.group_advantages(REWARDS, 4, "batch")
    assert a.tolist() == pytest.approx([0.5640124, -0.5640124, -0.5640124, 0.5640124, 0, 0, 0, 0], abs=1e-6)
    # the std over every process can be handed in
    assert G.group_advantages(REWARDS, 4, "batch", batch_std=torch.tensor(0.9999)).tolist()[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="groups of 3"):
        G.group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        G.group_advantages(REWARDS, 4, "rank")


def test_zero_std_groups():
    assert G.zero_std_groups(REWARDS, 4).tolist() == [False, True]
    assert G.zero_std_groups(torch.tensor([0.0, 0.0, 1.0, 0.0]), 2).tolist() == [True, False]


# ----------------------------------------------------------------------------- KL and clipping


def test_k3_kl():
    # logp = log 0.5, ref = log 0.25: d = ref - logp = log 0.5 = -0.6931472; e^d - d - 1 = 0.5 + 0.6931472 - 1
    kl = G.k3_kl(torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)]))
    assert kl.tolist() == pytest.approx([0.1931472, 0.0], abs=1e-6)
    # never negative, whichever way round
    x = torch.randn(100)
    assert (G.k3_kl(x, torch.randn(100)) >= 0).all()


def _loss(ratio: float, adv: float, **kw):
    logps = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out = G.grpo_token_loss(logps, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), **kw)
    out.loss.backward()
    return out, logps.grad.item()


def test_clipped_ratio_objective():
    # ratio 1.5, A = +1, eps 0.2: min(1.5, 1.2) = 1.2 -> loss -1.2, clipped high, no gradient
    out, grad = _loss(1.5, 1.0)
    assert out.loss.item() == pytest.approx(-1.2) and out.high_clipped.item() and not out.low_clipped.item()
    assert grad == 0.0
    # ratio 1.5, A = -1: min(-1.5, -1.2) = -1.5 -> loss 1.5, not clipped; d/dlogp (ratio) = ratio = 1.5
    out, grad = _loss(1.5, -1.0)
    assert out.loss.item() == pytest.approx(1.5) and not (out.high_clipped.item() or out.low_clipped.item())
    assert grad == pytest.approx(1.5)
    # ratio 0.5, A = -1: min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped low
    out, grad = _loss(0.5, -1.0)
    assert out.loss.item() == pytest.approx(0.8) and out.low_clipped.item() and grad == 0.0
    # ratio 0.5, A = +1: min(0.5, 0.8) = 0.5 -> loss -0.5, not clipped; gradient -A ratio = -0.5
    out, grad = _loss(0.5, 1.0)
    assert out.loss.item() == pytest.approx(-0.5) and grad == pytest.approx(-0.5)
    # clip-higher: eps_high 0.28 lets the ratio reach 1.28
    out, _ = _loss(1.5, 1.0, epsilon_high=0.28)
    assert out.loss.item() == pytest.approx(-1.28)


def test_on_policy_gradient_is_the_policy_gradient():
    # old = logp.detach(): ratio 1, loss = -A per token (+ beta kl); d loss / d logp_t = -A / n_tokens (grpo)
    logps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    out = G.grpo_token_loss(logps, logps.detach(), torch.tensor([2.0]), torch.ones(1, 3))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-2.0)
    assert logps.grad[0].tolist() == pytest.approx([-2 / 3] * 3)


def test_kl_term_and_beta():
    # ratio 1, A = 0: the loss is beta x kl; kl as in test_k3_kl
    logps = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    out = G.grpo_token_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 1), beta=0.1, ref_logps=ref)
    assert out.loss.item() == pytest.approx(0.01931472, abs=1e-7) and out.kl.item() == pytest.approx(0.1931472)
    assert G.grpo_token_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 1)).kl is None  # beta 0: no KL
    with pytest.raises(ValueError, match="ref_logps"):
        G.grpo_token_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 1), beta=0.1)


# ----------------------------------------------------------------------------- aggregation

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_aggregations():
    # grpo: per-sequence means (6/3 = 2 and 4/1 = 4), then their mean: 3
    assert G.aggregate_loss(PER_TOKEN, MASK, "grpo").item() == pytest.approx(3.0)
    # bnpo: all unmasked tokens together: (1 + 2 + 3 + 4) / 4 = 2.5
    assert G.aggregate_loss(PER_TOKEN, MASK, "bnpo").item() == pytest.approx(2.5)
    # dr_grpo: sum / (batch x max_completion_length) = 10 / (2 x 8) = 0.625; without the length, T = 4: 10 / 8
    assert G.aggregate_loss(PER_TOKEN, MASK, "dr_grpo", 8).item() == pytest.approx(0.625)
    assert G.aggregate_loss(PER_TOKEN, MASK, "dr_grpo").item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="grpo_loss_type"):
        G.aggregate_loss(PER_TOKEN, MASK, "sum")


def test_selective_log_softmax_matches_log_softmax():
    logits = torch.randn(5, 3, 11, dtype=torch.bfloat16)
    idx = torch.randint(0, 11, (5, 3))
    want = logits.float().log_softmax(-1).gather(-1, idx[..., None]).squeeze(-1)
    got = G.selective_log_softmax(logits, idx, chunk=2)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)


# ----------------------------------------------------------------------------- arguments


def test_grpo_arguments():
    from lmforge.arguments import ArgumentError, RlhfArguments, parse_args

    a = RlhfArguments(rlhf_type="grpo", reward_funcs=["accuracy"], loss_type="dr_grpo")
    assert (a.grpo_loss_type, a.loss_type, a.resolved_beta, a.needs_reference) == ("dr_grpo", None, 0.04, True)
    assert not RlhfArguments(rlhf_type="grpo", reward_funcs=["accuracy"], beta=0).needs_reference
    assert RlhfArguments(rlhf_type="grpo", reward_funcs=["accuracy"]).resolved_grpo_loss_type == "grpo"
    for bad, match in [(dict(), "no reward"), (dict(reward_funcs=["accuracy"], num_generations=1), "num_generations"),
                       (dict(reward_funcs=["accuracy"], loss_type="sigmoid"), "grpo_loss_type"),
                       (dict(reward_funcs=["accuracy"], reward_weights=[1.0, 2.0]), "reward_weights"),
                       (dict(reward_funcs=["accuracy"], rollout_url="http://x", infer_backend="native"), "pick one"),
                       (dict(reward_funcs=["accuracy"], beta=0, ref_model="m"), "beta 0")]:
        with pytest.raises(ArgumentError, match=match):
            RlhfArguments(rlhf_type="grpo", **bad)
    args = parse_args(RlhfArguments, ["--rlhf_type", "grpo", "--reward_funcs", "accuracy", "format",
                                      "--reward_weights", "1", "0.5", "--grpo_loss_type", "bnpo",
                                      "--scale_rewards", "none", "--epsilon_high", "0.28",
                                      "--reward_kwargs", '{"format": {"pattern": "\\\\d+"}}'])
    assert (args.reward_weights, args.grpo_loss_type, args.scale_rewards, args.epsilon_high) == \
        ([1.0, 0.5], "bnpo", "none", 0.28)
    assert args.reward_kwargs == {"format": {"pattern": "\\d+"}}
    with pytest.raises(SystemExit):
        parse_args(RlhfArguments, ["--rlhf_type", "grpo", "--reward_funcs", "accuracy", "--scale_rewards", "rank"])


def test_cli_route_lists_grpo_sample_and_rollout():
    from lmforge.cli.main import ROUTES

    assert "grpo" in ROUTES["rlhf"][2]
    assert {"sample", "rollout"} <= set(ROUTES)


# ----------------------------------------------------------------------------- weights


def test_policy_named_weights_merges_lora_and_hf_engine_loads_them():
    from peft import LoraConfig, get_peft_model

    from lmforge.infer.hf import HfEngine
    from lmforge.model import get_model_tokenizer
    from lmforge.rlhf.rollout import policy_named_weights

    model, tok = get_model_tokenizer("builtin:tiny", device="cpu")
    plain_names = {n for n, _ in model.named_parameters()}
    target, _ = get_model_tokenizer("builtin:tiny", device="cpu")
    engine = HfEngine(model_obj=target, tokenizer=tok)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              modules_to_save=["norm"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_()
    named = dict(policy_named_weights(policy))
    assert set(named) == plain_names  # plain transformers names only: no lora_*, no base_layer, no copies
    merged = policy.merge_and_unload()
    for n, p in merged.named_parameters():
        assert torch.allclose(named[n], p, atol=1e-6), n
    engine.update_weights(named.items())
    for n, p in target.named_parameters():
        assert torch.equal(p, named[n].to(p.dtype)), n
    with pytest.raises(KeyError, match="not parameters"):
        engine.update_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])


def test_update_weights_is_a_noop_on_the_training_model_itself():
    from lmforge.infer.base import InferEngine
    from lmforge.infer.hf import HfEngine
    from lmforge.model import get_model_tokenizer

    model, tok = get_model_tokenizer("builtin:tiny", device="cpu")
    engine = HfEngine(model_obj=model, tokenizer=tok)
    before = {n: p.clone() for n, p in model.named_parameters()}
    engine.update_weights(model.named_parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())

    class Bare(InferEngine):
        def infer(self, requests, request_config=None, *, use_tqdm=None):
            return []

        def infer_stream(self, request, request_config=None):
            return iter(())

    with pytest.raises(NotImplementedError, match="Bare engine"):
        Bare().update_weights([])


# ----------------------------------------------------------------------------- training runs


def _grpo_args(tmp_path, **kw):
    from lmforge.arguments import RlhfArguments

    base = dict(rlhf_type="grpo", model="builtin:tiny", dataset=["builtin:arith-rl#48"], reward_funcs=["accuracy"],
                train_type="full", num_generations=4, max_completion_length=6, per_device_train_batch_size=4,
                gradient_accumulation_steps=1, max_steps=3, logging_steps=1, learning_rate=1e-3, beta=0.0,
                output_dir=str(tmp_path), add_version=False, report_to=["none"], plot=False, save_steps=1000)
    base.update(kw)
    return RlhfArguments(**base)


def _train_logs(result):
    return [h for h in result["log_history"] if "loss" in h]


def _half_right(engine, request, k):
    """Even sums: every sample right (a zero-std group); odd sums: samples 0 and 1 right."""
    from test_grpo_support import question_of

    a, op, b = question_of(engine, request)
    right = str(a + b if op == "+" else a - b)
    return right if (a + b) % 2 == 0 or k < 2 else "0"


def test_dynamic_sampling_weight_push_and_iterations(tmp_path):
    from lmforge.model import get_model_tokenizer
    from lmforge.pipelines.rlhf import grpo_main
    from test_grpo_support import ScriptedEngine

    tok = get_model_tokenizer("builtin:tiny", load_model=False)[1]
    engine = ScriptedEngine(tok, _half_right)
    result = grpo_main(_grpo_args(tmp_path, dynamic_sample=True, max_resample_times=8, num_iterations=2,
                                  max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                                  scale_rewards="none"), engine=engine)
    logs = _train_logs(result)
    rollout_steps = [h for h in logs if "reward" in h]
    assert [h["step"] for h in rollout_steps] == [1, 3]  # num_iterations 2: steps 2 and 4 reuse the rollouts
    for h in rollout_steps:
        # only groups with differing rewards were kept: half right each, advantages +-0.5
        assert h["frac_reward_zero_std"] == 0.0 and h["dynamic_sample/kept_groups"] == 1.0
        assert h["reward"] == pytest.approx(0.5) and h["rewards/accuracy/mean"] == pytest.approx(0.5)
    assert all("kl" not in h and "clip_ratio/region_mean" in h for h in logs)
    # weights pushed before the first rollout and after each optimizer step that preceded one (steps 0 and 2)
    assert len(engine.updates) == 2
    policy = dict(result["trainer"].model.named_parameters())
    assert set(engine.updates[0]) == set(policy)
    assert any(not torch.equal(engine.updates[0][n], engine.updates[1][n]) for n in policy)  # the policy moved
    # the scripted samples were asked for as token ids (the trainer's own prompt encoding), G at a time
    first = engine.requests[0][0]
    assert first.prompt and tok.decode(first.prompt).endswith("<|im_start|>assistant\n")


def test_grpo_learns_from_scripted_rollouts(tmp_path):
    """Rewarding "7" over any other reply: after a few steps the policy puts more mass on "7"."""
    from lmforge.model import get_model_tokenizer
    from lmforge.pipelines.rlhf import grpo_main
    from lmforge.registry import REWARDS
    from test_grpo_support import ScriptedEngine

    if "is_seven" not in REWARDS:
        REWARDS.register("is_seven", lambda completions, **kw: [float(c == "7") for c in completions])
    tok = get_model_tokenizer("builtin:tiny", load_model=False)[1]
    engine = ScriptedEngine(tok, lambda e, r, k: "7" if k % 2 else "3")
    result = grpo_main(_grpo_args(tmp_path, reward_funcs=["is_seven"], max_steps=6, learning_rate=3e-3,
                                  beta=0.04, grpo_loss_type="bnpo"), engine=engine)
    trainer = result["trainer"]
    model = trainer.model.eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    seven, three = tok.encode("7", add_special_tokens=False)[0], tok.encode("3", add_special_tokens=False)[0]
    assert logp[seven] > logp[three]
    logs = _train_logs(result)
    assert all("kl" in h for h in logs) and logs[-1]["kl"] > 0  # beta > 0: the policy drifted from the reference


def test_grpo_hf_engine_lora_run_logs_and_checkpoints(tmp_path):
    """The real colocated hf engine on a LoRA policy (reference = adapters off), completions logged."""
    from pathlib import Path

    from lmforge.pipelines.rlhf import rlhf_main

    args = _grpo_args(tmp_path, train_type="lora", beta=0.1, reward_funcs=["accuracy", "length"],
                      reward_weights=[1.0, 0.5], log_completions=True, max_steps=2, num_iterations=2,
                      split_dataset_ratio=0.25)
    result = rlhf_main(args)
    # evaluation samples the held-out prompts the same way and reports the same metrics
    assert {"eval_loss", "eval_reward", "eval_rewards/accuracy/mean", "eval_completions/mean_length"} <= \
        set(result["metrics"])
    logs = _train_logs(result)
    first = logs[0]
    for key in ("reward", "reward_std", "rewards/accuracy/mean", "rewards/length/mean", "kl", "clip_ratio/low_mean",
                "completions/mean_length", "completions/min_length", "completions/max_length",
                "completions/clipped_ratio", "rollout/tokens_per_s", "frac_reward_zero_std"):
        assert key in first, key
    assert 1 <= first["completions/min_length"] <= first["completions/mean_length"] <= 6
    last = Path(result["last_checkpoint"])
    assert (last / "adapter_config.json").is_file()
    saved = json.loads((Path(tmp_path) / "args.json").read_text())
    assert saved["rlhf_type"] == "grpo" and saved["beta"] == 0.1
    lines = (Path(tmp_path) / "completions.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    assert row["prompt"][0]["role"] == "user" and len(row["completions"]) == 4 and len(row["rewards"]) == 4
    assert result["trainer"]._colocated and result["trainer"]._engine.model is result["trainer"].model


def test_grpo_pushes_weights_to_a_native_engine(tmp_path):
    """The native engine's CPU reference path stands in for CUDA: after the pushes it answers as the policy does."""
    try:
        from lmforge.infer.native import NativeEngine
    except ImportError as e:  # pragma: no cover - the native engine is optional
        pytest.skip(f"native engine not importable: {e}")
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine
    from lmforge.model import get_model_tokenizer
    from lmforge.pipelines.rlhf import grpo_main
    from lmforge.rlhf.rollout import policy_named_weights

    from lmforge.registry import REWARDS

    if "odd_length" not in REWARDS:  # differs within groups, so the policy really moves
        REWARDS.register("odd_length", lambda completions, **kw: [float(len(c) % 2) for c in completions])
    model, tok = get_model_tokenizer("builtin:tiny", device="cpu")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = NativeEngine(model_obj=model, tokenizer=tok, allow_cpu=True, max_num_seqs=16, enforce_eager=True)
    try:
        result = grpo_main(_grpo_args(tmp_path, reward_funcs=["odd_length"], learning_rate=5e-3, max_steps=2,
                                      infer_backend="native"), engine=engine)
        trainer = result["trainer"]
        assert any(not torch.equal(start[n], p) for n, p in trainer.model.named_parameters())
        logs = _train_logs(result)
        assert all(h["rollout/tokens_per_s"] > 0 and "rollout/sync_seconds" in h for h in logs)
        engine.update_weights(policy_named_weights(trainer.model))
        req = [InferRequest(messages=[{"role": "user", "content": "What is 12 + 30?"}])]
        greedy = RequestConfig(max_tokens=8)
        want = HfEngine(model_obj=trainer.model, tokenizer=tok).infer(req, greedy)[0].choices[0].token_ids
        assert engine.infer(req, greedy)[0].choices[0].token_ids == want
    finally:
        getattr(engine, "close", lambda: None)()


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_trainer_builds_the_native_engine(tmp_path, monkeypatch, train_type):
    """--infer_backend native as the trainer builds it (CPU reference path): a LoRA policy's frozen base stays
    untouched by the merged-weight pushes, and the engine ends up answering as the policy does."""
    try:
        import lmforge.infer.native  # noqa: F401
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"native engine not importable: {e}")
    import lmforge.infer
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine
    from lmforge.pipelines.rlhf import rlhf_main
    from lmforge.registry import REWARDS
    from lmforge.rlhf.rollout import policy_named_weights

    real = lmforge.infer.get_engine
    monkeypatch.setattr(lmforge.infer, "get_engine", lambda backend, **kw: real(
        backend, **({**kw, "allow_cpu": True, "enforce_eager": True} if backend == "native" else kw)))
    if "odd_length" not in REWARDS:
        REWARDS.register("odd_length", lambda completions, **kw: [float(len(c) % 2) for c in completions])
    result = rlhf_main(_grpo_args(tmp_path, train_type=train_type, reward_funcs=["odd_length"], learning_rate=5e-3,
                                  max_steps=2, infer_backend="native"))
    trainer = result["trainer"]
    engine = trainer._engine
    assert type(engine).__name__ == "NativeEngine" and not trainer._colocated
    if train_type == "lora":
        from lmforge.model import get_model_tokenizer

        fresh = dict(get_model_tokenizer("builtin:tiny", device="cpu")[0].named_parameters())
        base = trainer.model.get_base_model()
        for n, p in base.named_parameters():
            if "lora_" not in n:
                assert torch.equal(p, fresh[n.replace(".base_layer", "")]), n
    engine.update_weights(policy_named_weights(trainer.model))
    req = [InferRequest(messages=[{"role": "user", "content": "What is 12 + 30?"}])]
    want = HfEngine(model_obj=trainer.model, tokenizer=trainer.processing_class).infer(req, RequestConfig(max_tokens=8))
    assert engine.infer(req, RequestConfig(max_tokens=8))[0].choices[0].token_ids == want[0].choices[0].token_ids
    getattr(engine, "close", lambda: None)()
