"""Multi-turn rollouts: the tool-call scheduler, trajectories through an engine, and which tokens train."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge.infer.protocol import ChatMessage, Choice, Function, ToolCall
from lmforge.rlhf.multi_turn import MultiTurnScheduler, ToolCallScheduler, build_scheduler, calculator, reply_messages


def _choice(content=None, calls=(), reason="stop"):
    tcs = [ToolCall(function=Function(name=n, arguments=json.dumps(a) if isinstance(a, dict) else a))
           for n, a in calls] or None
    return Choice(index=0, message=ChatMessage(role="assistant", content=content, tool_calls=tcs),
                  finish_reason=reason, token_ids=[1])


def test_tool_call_scheduler():
    s = build_scheduler("tool_call", max_turns=3)
    assert isinstance(s, ToolCallScheduler) and build_scheduler(None, 3) is None
    call = _choice(calls=[("calculator", {"expression": "12 * (3 + 1)"}), ("weather", {"city": "Oslo"})],
                   reason="tool_calls")
    assert not s.check_finished([], call, 1) and s.check_finished([], call, 3)  # max_turns reached
    assert s.check_finished([], _choice("It is 48."), 1)  # a reply without calls ends it
    assert s.check_finished([], _choice(calls=[("calculator", {})], reason="length"), 1)  # cut off: ends
    out = s.step([], call, {})
    assert out[0] == {"role": "tool_response", "content": "48"} and out[1]["role"] == "tool_response"
    assert out[1]["content"].endswith(("sunny", "cloudy", "rainy", "windy")) and " C, " in out[1]["content"]
    assert s.run("nope", "{}").startswith("error: unknown tool 'nope'")
    assert s.run("calculator", '{"expression": "__import__(\'os\')"}').startswith("error: ValueError")
    assert s.run("calculator", "[1, 2]") == "error: the arguments of calculator must be a JSON object"
    assert s.run("calculator", '{"expr": "1"}').startswith("error: TypeError")
    assert calculator("7 / 2") == "3.5" and calculator("-3 + 10") == "7"
    with pytest.raises(ValueError, match="Did you mean 'tool_call'"):
        build_scheduler("toolcall", 3)
    with pytest.raises(ValueError, match="max_turns"):
        MultiTurnScheduler(max_turns=0)
    with pytest.raises(ValueError, match="multi_turn_kwargs"):
        build_scheduler("tool_call", 3, {"colour": "red"})
    assert reply_messages(call)[0] == {"role": "tool_call", "content": json.dumps(
        {"name": "calculator", "arguments": {"expression": "12 * (3 + 1)"}})}
    assert reply_messages(_choice("hi")) == [{"role": "assistant", "content": "hi"}]


def _agent(engine, request, k):
    """Even samples call the calculator and then answer with its result; odd ones answer at once."""
    last = request.messages[-1] if request.messages else None
    if last is not None and last.role in ("tool", "tool_response"):
        return f"The answer is {last.content}."
    return {"tool": "calculator", "arguments": {"expression": "2 + 3"}} if k % 2 == 0 else "I guess 4."


def test_run_rollouts_drives_turns():
    from lmforge.model import get_model_tokenizer
    from lmforge.rlhf.rollout import RolloutPrompt, run_rollouts
    from lmforge.infer.protocol import RequestConfig
    from test_grpo_support import ScriptedEngine

    tok = get_model_tokenizer("builtin:tiny", load_model=False)[1]
    engine = ScriptedEngine(tok, _agent)
    prompts = [RolloutPrompt([{"role": "user", "content": "What is 2 + 3?"}])]
    eps = run_rollouts(engine, prompts, RequestConfig(max_tokens=8), num_generations=4,
                       scheduler=ToolCallScheduler(max_turns=3))
    assert [e.turns for e in eps] == [2, 1, 2, 1] and [e.multi_turn for e in eps] == [True, False, True, False]
    assert [e.completion for e in eps] == ["The answer is 5.", "I guess 4."] * 2
    assert [m["role"] for m in eps[0].messages] == ["user", "tool_call", "tool_response", "assistant"]
    assert eps[0].messages[2]["content"] == "5"
    assert eps[0].generated_tokens == len(eps[0].completion_ids) + len(tok.encode("The answer is 5.")) + 1
    # turn 2 was one request per live trajectory, n=1 each
    assert len(engine.requests) == 2 and len(engine.requests[1]) == 2
    # max_turns 1: the tool is never run
    once = run_rollouts(engine, prompts, RequestConfig(max_tokens=8), num_generations=2,
                        scheduler=ToolCallScheduler(max_turns=1))
    assert [e.turns for e in once] == [1, 1] and not any(e.multi_turn for e in once)


def test_multi_turn_grpo_trains_only_the_model_turns(tmp_path):
    from lmforge.arguments import RlhfArguments
    from lmforge.model import get_model_tokenizer
    from lmforge.pipelines.rlhf import grpo_main
    from lmforge.registry import REWARDS
    from test_grpo_support import ScriptedEngine

    if "used_tool" not in REWARDS:  # the whole trajectory reaches rewards as `messages`
        REWARDS.register("used_tool", lambda completions, messages, **kw: [
            float(any(m["role"] == "tool_call" for m in ms)) for ms in messages])
    tok = get_model_tokenizer("builtin:tiny", load_model=False)[1]
    engine = ScriptedEngine(tok, _agent)
    args = RlhfArguments(rlhf_type="grpo", model="builtin:tiny", dataset=["builtin:tool-calls#8"],
                         agent_template="hermes", reward_funcs=["used_tool"], multi_turn_scheduler="tool_call",
                         max_turns=3, train_type="full", num_generations=4, max_completion_length=16,
                         per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=1, logging_steps=1,
                         beta=0.0, output_dir=str(tmp_path), add_version=False, report_to=["none"], plot=False,
                         save_steps=1000)
    result = grpo_main(args, engine=engine)
    log = [h for h in result["log_history"] if "loss" in h][0]
    assert log["rewards/used_tool/mean"] == 0.5 and log["completions/mean_turns"] == 1.5
    assert engine.requests[0][0].tools  # the row's tools went with the prompt
    batch = result["trainer"]._step_batches[0]
    ids, mask = batch["completion_ids"], batch["completion_mask"]
    trained = tok.decode([t for t, m in zip(ids[0].tolist(), mask[0].tolist()) if m])
    untrained = tok.decode([t for t, m, a in zip(ids[0].tolist(), mask[0].tolist(), batch["attention_mask"][0][-ids.shape[1]:])
                            if not m and a])
    # sample 0 called the tool: its call and its final answer train, the tool's result does not
    assert "calculator" in trained and "The answer is 5." in trained
    assert "5" in untrained and "The answer" not in untrained and "<tool_response>" in untrained
    # sample 1 answered at once: its sampled ids, all trained
    assert tok.decode(ids[1][mask[1].bool()].tolist()) == "I guess 4.<|im_end|>"
    assert torch.equal(mask[1][: int(mask[1].sum())], torch.ones(int(mask[1].sum())))
