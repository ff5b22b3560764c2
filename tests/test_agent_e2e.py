"""End to end: builtin:tiny learns to call tools from builtin:tool-calls, then full tool loops run against
the served model through the official openai client (streaming included).

Content is asserted in aggregate over held-out questions, never on one sampled answer: a 1,500-step
tiny model gets most, not all, questions right, and which ones differs between CPUs. The server loops
run on held-out questions the engine itself answered right (greedy), and the streaming check compares
a streamed answer with the same request answered whole — the protocol, not the model's luck.
"""
from __future__ import annotations

import json
import os
import time

import pytest

pytestmark = pytest.mark.slow

# Trained until a probe on 50 other held-out questions (every 250 steps from step 1,000) gets PROBE_BAR of the
# calls right, with a cap of CAP_STEPS. At a fixed 1,500 steps the held-out accuracy depended on the seed and the
# CPU (93% on the machine the recipe was calibrated on; 92% and 75% for seeds 3 and 5 on an H200 host's CPU,
# 2026-11-29), so the test measures instead of counting steps. The recipe is calibrated without warm-up
# (600 steps gave 26%; a 5% warm-up, 73%).
# --agent_template hermes: its short tools prompt keeps rows ~270 tokens (the ChatML template's own is ~420),
# and the checkpoint's args.json carries it to the engine.
CAP_STEPS = int(os.environ.get("LMFORGE_AGENT_E2E_STEPS", "2500"))
PROBE_BAR = 0.9
SEED = int(os.environ.get("LMFORGE_TEST_SEED", "42"))  # the flakiness check varies it
RECIPE = dict(seed=SEED, data_seed=SEED, model="builtin:tiny", dataset=["builtin:tool-calls"], agent_template="hermes",
              train_type="full", learning_rate=2e-3, warmup_ratio=0.0, max_steps=CAP_STEPS,
              per_device_train_batch_size=8, gradient_accumulation_steps=1, save_steps=100_000, logging_steps=100,
              report_to=["none"], plot=False)
GREEDY = {"temperature": 0}


def _tool_result(row: dict) -> str:
    """The held-out row's own tool result (what the real tool returned when the row was made)."""
    return next(m["content"] for m in row["messages"] if m["role"] == "tool_response")


def _right_calls(engine, rows) -> list[dict]:
    """The held-out rows whose question the engine answers (greedily) with exactly the expected tool call."""
    from lmforge.infer import InferRequest, RequestConfig

    reqs = [InferRequest(messages=[r["messages"][0]], tools=json.loads(r["tools"])) for r in rows]
    outs = engine.infer(reqs, RequestConfig(max_tokens=40, **GREEDY), use_tqdm=False)
    right = []
    for out, row in zip(outs, rows):
        calls, want = out.choices[0].message.tool_calls or [], json.loads(row["solution"])
        if (len(calls) == 1 and calls[0].function.name == want["name"]
                and json.loads(calls[0].function.arguments) == want["arguments"]):
            right.append(row)
    return right


def _probe(rows: list[dict], history: list):
    """Stop training once the probe rows' tool calls are PROBE_BAR right (every 250 steps from step 1,000)."""
    from transformers import TrainerCallback

    from lmforge.infer.hf import HfEngine
    from lmforge.template import get_template

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            if state.global_step < 1000 or state.global_step % 250:
                return
            was_training = model.training
            engine = HfEngine(model_obj=model, tokenizer=processing_class, max_batch_size=50,
                              template=get_template(processing_class, agent_template="hermes"))
            try:
                history.append((state.global_step, len(_right_calls(engine, rows)) / len(rows)))
            finally:
                model.train(was_training)
            control.should_training_stop = history[-1][1] >= PROBE_BAR

    return Probe()


def _fact(row: dict) -> str:
    """What the final answer must repeat from the tool result: the number, or the temperature."""
    result = _tool_result(row)
    return result.split(",")[0] if "," in result else result


def test_tool_calling_sft_serve_and_loop(tmp_path):
    import openai

    from lmforge import TrainArguments, sft_main
    from lmforge.arguments import DeployArguments
    from lmforge.dataset import load_dataset
    from lmforge.dataset.builtin import TOOL_CALL_TOOLS
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine
    from lmforge.serve import create_app
    from lmforge.serve.server import ServerThread

    from lmforge.registry import CALLBACKS

    start = time.time()
    rows = list(load_dataset(["builtin:tool-calls:test#150"], shuffle=False)[0])
    rows, probe_rows = rows[:100], rows[100:]
    history: list = []
    ckpt = os.environ.get("LMFORGE_AGENT_E2E_CKPT")  # reuse a trained checkpoint (debugging the serving half)
    if not ckpt:
        CALLBACKS.register("agent_probe", _probe(probe_rows, history), overwrite=True)
        ckpt = sft_main(TrainArguments(**RECIPE, callbacks=["agent_probe"], output_dir=str(tmp_path)))["last_checkpoint"]
    trained = time.time() - start
    engine = HfEngine(ckpt_dir=ckpt, device="cpu", max_batch_size=50)
    assert engine.template.agent_template.name == "hermes" and engine.template.agent_render

    # held-out questions: the right tool with the right arguments
    right_rows = _right_calls(engine, rows)
    accuracy = len(right_rows) / len(rows)
    print(f"tool-call accuracy on 100 held-out questions ({trained:.0f}s training; probes {history}): "
          f"{accuracy:.0%}")
    assert not history or history[-1][1] >= PROBE_BAR, f"not learnt within {CAP_STEPS} steps: {history}"
    assert accuracy >= 0.8

    # full loops through the server on up to 20 of the questions the engine answered right
    chosen = right_rows[:20]
    with ServerThread(create_app(engine, DeployArguments(served_model_name="tiny-agent", max_new_tokens=60))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        same_call = answered = 0
        for row in chosen:
            want = json.loads(row["solution"])
            messages = [{"role": "user", "content": row["messages"][0]["content"]}]
            first = client.chat.completions.create(model="tiny-agent", messages=messages, tools=TOOL_CALL_TOOLS,
                                                   tool_choice="auto", **GREEDY)
            choice = first.choices[0]
            # protocol: a parsed call ends the turn with finish_reason tool_calls and leaves no markup in the text
            assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
            assert "<tool_call>" not in (choice.message.content or "")
            if not choice.message.tool_calls:
                continue
            call = choice.message.tool_calls[0]
            assert call.id and call.type == "function"
            same_call += call.function.name == want["name"] and json.loads(call.function.arguments) == want["arguments"]
            # the tool's result goes back in the next request; the model answers with it
            messages += [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": _tool_result(row)}]
            second = client.chat.completions.create(model="tiny-agent", messages=messages, tools=TOOL_CALL_TOOLS,
                                                    **GREEDY)
            assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
            answered += _fact(row) in (second.choices[0].message.content or "")
        print(f"server loops on {len(chosen)} held-out questions: {same_call} same call as the engine, "
              f"{answered} final answers repeat the tool's result")
        assert same_call >= 0.9 * len(chosen)
        assert answered >= 0.8 * len(chosen)

        # streaming: the call arrives as OpenAI-shaped delta.tool_calls, no <tool_call> text leaks out, and
        # it is the call the same request gets when answered whole
        for row in [r for r in chosen if json.loads(r["solution"])["name"] == "weather"][:3]:
            messages = [{"role": "user", "content": row["messages"][0]["content"]}]
            whole = client.chat.completions.create(model="tiny-agent", tools=TOOL_CALL_TOOLS, messages=messages,
                                                   **GREEDY).choices[0]
            stream = client.chat.completions.create(model="tiny-agent", tools=TOOL_CALL_TOOLS, stream=True,
                                                    messages=messages, **GREEDY)
            text, calls, reasons = "", {}, []
            for chunk in stream:
                for c in chunk.choices:
                    text += c.delta.content or ""
                    for tc in c.delta.tool_calls or []:
                        entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                        entry["name"] += tc.function.name or ""
                        entry["arguments"] += tc.function.arguments or ""
                    if c.finish_reason:
                        reasons.append(c.finish_reason)
            assert reasons == [whole.finish_reason] and "<tool_call>" not in text
            assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
                (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls or []]
            assert all(c["id"] for c in calls.values())

        # tool_choice "none": no tools are shown, so no call is parsed
        plain = client.chat.completions.create(model="tiny-agent", messages=[{"role": "user", "content": "Hi"}],
                                               tools=TOOL_CALL_TOOLS, tool_choice="none", max_tokens=10)
        assert not plain.choices[0].message.tool_calls
