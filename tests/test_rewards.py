"""Reward functions (ORMs), reward models as rewards, and process reward models (PRMs)."""
from __future__ import annotations

import math

import pytest
import torch

from lmforge.registry import PRMS, REWARDS
from lmforge.rlhf.rewards import (RewardError, answers_match, build_reward_funcs, score_completions,
                                  weighted_rewards)


def test_registry_has_the_builtins():
    assert {"accuracy", "format", "cosine", "length", "repetition"} <= set(REWARDS.names())
    assert {"arith_steps", "reward_model"} <= set(PRMS.names())


def test_answers_match():
    assert answers_match("82", "82") and answers_match("The answer is 82.", "82")
    assert answers_match("so \\boxed{\\frac{3}{4}}", "0.75") and answers_match("1,000 apples", "1000")
    assert answers_match("#### 18", "18") and not answers_match("81", "82") and not answers_match(None, "1")
    assert answers_match("  Paris ", "paris") and not answers_match("Lyon", "Paris")


def test_accuracy():
    acc = REWARDS.get("accuracy")()
    assert acc(["82", "I think 81", "x \\boxed{7}", "y"], solution=["82", "82", "7", None]) == [1.0, 0.0, 1.0, None]
    strict = REWARDS.get("accuracy")(strict=True)
    assert strict(["82", " 82\n", "82 82"], solution=["82"] * 3) == [1.0, 1.0, 0.0]
    with pytest.raises(RewardError, match="'solution' column"):
        acc(["1"], answer=["1"])


def test_format():
    fmt = REWARDS.get("format")()
    assert fmt(["<think>a\nb</think> <answer>3</answer>", "<answer>3</answer>", "<think>x</think><answer>1</answer>!"]) \
        == [1.0, 0.0, 0.0]
    digits = REWARDS.get("format")(pattern=r"\d+")
    assert digits(["42", " 42 ", "4 2", "x"]) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(RewardError, match="bad pattern"):
        REWARDS.get("format")(pattern="(")


def test_cosine():
    # r(L) = end + (start - end)(1 + cos(pi L / max_len)) / 2 with max_len 100:
    #   right, L 0: 1.0; right, L 50: 0.5 + 0.5 x 0.5 = 0.75; right, L 100 (and beyond): 0.5
    #   wrong, L 0: -1.0; wrong, L 50: -0.5 + (-0.5)(1 + 0) / 2 = -0.75; wrong, L 100: -0.5
    cos = REWARDS.get("cosine")(max_len=100)
    got = cos(["7", "7", "7", "7", "1", "1", "1"], solution=["7"] * 4 + ["7"] * 3,
              completion_lengths=[0, 50, 100, 400, 0, 50, 100])
    assert got == pytest.approx([1.0, 0.75, 0.5, 0.5, -1.0, -0.75, -0.5])
    # without token counts, characters; max_len from the run's max_completion_length
    assert REWARDS.get("cosine")(max_completion_length=2)(["7"], solution=["7"]) == pytest.approx([0.75])


def test_length_soft_overlong_punishment():
    # max_len 10, cache 4: 0 up to 6 tokens, then (6 - L) / 4, -1 beyond 10
    rew = REWARDS.get("length")(max_len=10, cache=4)
    assert rew(["a"] * 5, completion_lengths=[3, 6, 8, 10, 11]) == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert REWARDS.get("length")(max_completion_length=10).cache == 2
    with pytest.raises(RewardError, match="cache"):
        REWARDS.get("length")(max_len=10, cache=11)


def test_repetition():
    rep = REWARDS.get("repetition")(ngram_size=2, max_penalty=-1.0)
    # "a b a b a b": bigrams ab ba ab ba ab -> 2 distinct of 5 -> -(1 - 2/5) = -0.6; all distinct -> 0; 1 word -> 0
    assert rep(["a b a b a b", "one two three", "solo"]) == pytest.approx([-0.6, 0.0, 0.0])
    with pytest.raises(RewardError, match="max_penalty"):
        REWARDS.get("repetition")(max_penalty=1.0)


def test_build_score_and_weights(tmp_path):
    from lmforge.registry import load_plugins

    plugin = tmp_path / "my_rewards.py"
    plugin.write_text("from lmforge.registry import REWARDS\n"
                      "@REWARDS.register('shouts')\n"
                      "def shouts(completions, **kwargs):\n"
                      "    return [1.0 if c.isupper() else None for c in completions]\n")
    load_plugins([str(plugin)])
    funcs = build_reward_funcs(["accuracy", "shouts", "length"], reward_kwargs={"length": {"cache": 1}},
                               max_completion_length=4)
    assert [n for n, _ in funcs] == ["accuracy", "shouts", "length"] and funcs[2][1].max_len == 4
    table = score_completions(funcs, ["7", "NO"], {"solution": ["7", "7"], "completion_lengths": [2, 4]})
    assert table[0, 0] == 1 and math.isnan(table[0, 1]) and table[1, 1] == 1 and table[1, 2] == -1
    # weighted sum, a reward that does not apply counts 0: [1 + 0 + 0, 0 + 2 x 1 + 0.5 x -1]
    assert weighted_rewards(table, [1.0, 2.0, 0.5]).tolist() == pytest.approx([1.0, 1.5])
    with pytest.raises(RewardError, match="Did you mean 'accuracy'"):
        build_reward_funcs(["acuracy"])
    with pytest.raises(RewardError, match="not in --reward_funcs"):
        build_reward_funcs(["accuracy"], reward_kwargs={"format": {}})
    with pytest.raises(RewardError, match="--reward_kwargs for reward 'format'"):
        build_reward_funcs(["format"], reward_kwargs={"format": {"regex": "x"}})
    with pytest.raises(RewardError, match="plain function"):
        build_reward_funcs(["shouts"], reward_kwargs={"shouts": {"x": 1}})
    REWARDS.register("broken", lambda completions, **kw: [1.0])
    with pytest.raises(RewardError, match="'broken' returned 1 values for 2"):
        score_completions(build_reward_funcs(["broken"]), ["a", "b"], {})
    REWARDS.register("raises", lambda completions, **kw: 1 / 0)
    with pytest.raises(RewardError, match="'raises' failed: ZeroDivisionError"):
        score_completions(build_reward_funcs(["raises"]), ["a"], {})


def test_reward_model_as_reward(tmp_path):
    """A reward-model checkpoint (a tiny sequence-classification model) scores prompt + reply."""
    from lmforge.model import get_model_tokenizer
    from lmforge.rlhf.reward_model import reward_model_from_causal_lm

    causal, tok = get_model_tokenizer("builtin:tiny", device="cpu")
    rm = reward_model_from_causal_lm(causal, tok)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    (name, scorer), = build_reward_funcs([], reward_models=[str(tmp_path / "rm")], device="cpu")
    assert name == "rm_rm"
    prompts = [[{"role": "user", "content": "What is 1 + 1?"}]] * 3
    got = scorer(["2", "3", "2"], prompts=prompts)
    assert len(got) == 3 and got[0] == pytest.approx(got[2], abs=1e-5) and got[0] != pytest.approx(got[1], abs=1e-6)
    # the same as the model's own score at the last token of the rendered conversation
    ids = tok.apply_chat_template([*prompts[0], {"role": "assistant", "content": "3"}], return_dict=True)["input_ids"]
    with torch.no_grad():
        want = rm.eval()(torch.tensor([ids])).logits[0, 0].item()
    assert got[1] == pytest.approx(want, abs=1e-4)
    with pytest.raises(RewardError, match="not a sequence-classification"):
        from lmforge.model import builtin_model_dir

        build_reward_funcs([], reward_models=[str(builtin_model_dir("builtin:tiny"))], device="cpu")


def test_arith_steps_prm():
    from lmforge.rlhf.prm import aggregate_steps, build_prm, split_steps

    prm = build_prm("arith_steps")
    text = "First 12 + 30 = 42\nthen 42 * 2 = 86\nso the answer is 86"
    assert split_steps(text) == ["First 12 + 30 = 42", "then 42 * 2 = 86", "so the answer is 86"]
    assert prm([text, "2 + 3 = 5 = 10 / 2", ""]) == [[1.0, 0.0, None], [1.0], []]
    assert prm.score_step("Step 1: 7 × 8 = 56.") == 1.0 and prm.score_step("x = 4") is None
    assert aggregate_steps([1.0, 0.0, None], "min") == 0.0 and aggregate_steps([1.0, 0.5], "mean") == 0.75
    assert aggregate_steps([1.0, 0.5], "last") == 0.5 and aggregate_steps([0.5, 0.5], "prod") == 0.25
    assert aggregate_steps([None], "min") is None
    with pytest.raises(ValueError, match="prm_aggregate"):
        aggregate_steps([1.0], "max")
    with pytest.raises(RewardError, match="Did you mean 'arith_steps'"):
        build_prm("arith_step")
    with pytest.raises(RewardError, match="model"):
        build_prm("reward_model")


def test_lora_reward_model_checkpoint_as_reward(tmp_path):
    """A LoRA ``rlhf_type rm`` checkpoint (adapters + the new head) scores as the trained model does."""
    import datasets

    from lmforge.arguments import RlhfArguments
    from lmforge.pipelines.rlhf import rlhf_main

    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}],
             "rejected_response": str(i + 2)} for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    datasets.Dataset.from_list(rows).to_json(str(path))
    result = rlhf_main(RlhfArguments(rlhf_type="rm", model="builtin:tiny", dataset=[str(path)], max_steps=2,
                                     learning_rate=1e-2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                     output_dir=str(tmp_path / "rm"), add_version=False, report_to=["none"],
                                     plot=False))
    (name, scorer), = build_reward_funcs([], reward_models=[result["last_checkpoint"]], device="cpu")
    assert name == "rm_rm-checkpoint-2"
    prompts = [[{"role": "user", "content": "What is 3 + 1?"}]] * 2
    got = scorer(["4", "5"], prompts=prompts)
    trained = result["trainer"].model.eval()
    tok = result["trainer"].processing_class
    for reply, value in zip(["4", "5"], got):
        ids = tok.apply_chat_template([*prompts[0], {"role": "assistant", "content": reply}],
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            assert value == pytest.approx(trained(input_ids=torch.tensor([ids])).logits[0, 0].item(), abs=1e-4)


def test_latex_solutions_are_read_whole():
    """Issue #18: a bare-LaTeX solution was read as its last number, so the right \\boxed{\\frac{3}{4}} scored 0
    and the wrong \\boxed{4} scored 1."""
    acc = REWARDS.get("accuracy")()
    for solution in ("\\frac{3}{4}", "$\\frac{3}{4}$", "\\dfrac{3}{4}", "0.75", "3/4"):
        assert acc(["so \\boxed{\\frac{3}{4}}", "so \\boxed{4}"], solution=[solution] * 2) == [1.0, 0.0], solution
    assert answers_match("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}") and answers_match("The answer is \\frac{3}{4}.", "0.75")
    assert answers_match("\\boxed{x = 5}", "5") and answers_match("y = 5", "\\boxed{5}")
    assert answers_match("\\boxed{1000}", "10^{3}") and answers_match("\\boxed{10^{-2}}", "0.01")
    assert answers_match("\\boxed{2 \\times 10^{3}}", "2000") and not answers_match("\\boxed{10^{3}}", "30")


def test_percentages_only_as_fractions_when_asked():
    assert answers_match("\\boxed{50\\%}", "50") and not answers_match("\\boxed{50\\%}", "0.5")
    frac = REWARDS.get("accuracy")(percent="fraction")
    assert frac(["\\boxed{50\\%}", "\\boxed{50}"], solution=["0.5", "0.5"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="percent"):
        REWARDS.get("accuracy")(percent="ratio")


def test_which_boxed_counts():
    from lmforge.rlhf.answers import BOXED, final_answer

    assert BOXED == "last"  # one rule, the one lmforge eval uses
    assert final_answer("try \\boxed{2}, no: \\boxed{3}") == "3"
    assert answers_match("try \\boxed{2}, no: \\boxed{3}", "3") and not answers_match("\\boxed{2} then \\boxed{3}", "2")
