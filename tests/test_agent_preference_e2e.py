"""End to end: feedback recorded through the preference agent's HTTP endpoints trains a DPO round that raises
the preferred-answer rate (0.375 -> 0.875 of sampled answers polite on the held-out prompts when calibrated).
Takes about 35 s on two idle cores (60 s on a busy machine).

builtin:tiny is first taught two ways to answer the same request (a polite and a curt reply, half each), so
its samples differ the way a real model's do. A simulated user then asks the served agent for two answers to
each prompt and picks the polite one (or rates a lone answer up or down) over HTTP. ``lmforge preference train``
trains a DPO round on the recorded file and compares it with the model it started from on the held-out
records: the judge (a reward registered from a plugin file, as a user would) scores sampled answers, and
pair accuracy scores the held-out choices by log-probability.
"""
from __future__ import annotations

import json
import os
import urllib.request

import pytest

pytestmark = pytest.mark.slow

POLITE, CURT = "Sure, happy to help with that.", "No. Figure it out yourself."
TOPICS = ("the weather", "my taxes", "a recipe", "python code", "the news", "a poem", "my homework", "a trip",
          "the garden", "a letter", "my car", "the budget", "a song", "chess", "my resume", "the meeting",
          "a story", "math", "the report", "my bike", "a gift", "the party", "history", "the exam", "a plan",
          "the bug", "my phone", "a speech", "the map", "dinner", "a joke", "the plot", "my cat", "the move",
          "a game", "the slides", "my diet", "the lease", "an email", "the flight")
JUDGE = '''from lmforge.registry import REWARDS


@REWARDS.register("polite")
def polite(completions, **kwargs):
    return [1.0 if c.strip().startswith("Sure") else 0.0 for c in completions]
'''

SEED = int(os.environ.get("LMFORGE_TEST_SEED", "42"))  # the flakiness check varies it


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_feedback_over_http_raises_preferred_rate(tmp_path, capsys):
    from lmforge import TrainArguments, sft_main
    from lmforge.agents import EngineGenerator, build_agent
    from lmforge.agents.http import create_agent_app
    from lmforge.cli.main import main
    from lmforge.infer.hf import HfEngine
    from lmforge.serve.server import ServerThread

    rows = tmp_path / "two_styles.jsonl"
    with rows.open("w") as fh:
        for topic in TOPICS:
            for reply in (POLITE, CURT):
                fh.write(json.dumps({"messages": [{"role": "user", "content": f"Help me with {topic}."},
                                                  {"role": "assistant", "content": reply}]}) + "\n")
    start = sft_main(TrainArguments(model="builtin:tiny", dataset=[str(rows)], train_type="full", learning_rate=2e-3,
                                    max_steps=60, per_device_train_batch_size=16, gradient_accumulation_steps=1,
                                    warmup_ratio=0.0, output_dir=str(tmp_path / "sft"), save_steps=100_000,
                                    report_to=["none"], plot=False, seed=SEED, data_seed=SEED))["last_checkpoint"]

    feedback = tmp_path / "feedback.jsonl"
    agent = build_agent("preference", EngineGenerator(HfEngine(ckpt_dir=start, device="cpu")),
                        feedback_file=str(feedback), max_tokens=12)
    shown = 0
    with ServerThread(create_agent_app({"preference": agent})) as srv:
        for i, topic in enumerate(TOPICS * 2):  # each prompt shown twice, as a page would on two visits
            messages = [{"role": "user", "content": f"Help me with {topic}."}]
            pair = _post(f"{srv.url}/v1/agents/preference/compare", {"messages": messages, "seed": i})
            answers = pair["answers"]
            polite = [a.strip().startswith("Sure") for a in answers]
            shown += sum(polite)
            if polite[0] != polite[1]:  # the user picks the polite answer
                body = {"messages": messages, "answers": answers, "choice": polite.index(True)}
            else:  # two alike: a thumbs up or down on the first
                body = {"messages": messages, "response": answers[0], "rating": "up" if polite[0] else "down"}
            _post(f"{srv.url}/v1/agents/preference/feedback", {**body, "id": f"visit-{i}"})  # ids fix the held-out split
    assert 0.25 <= shown / (4 * len(TOPICS)) <= 0.75  # the starting model answers both ways

    plugin = tmp_path / "judge.py"
    plugin.write_text(JUDGE)
    code = main(["preference", "train", "--feedback_file", str(feedback), "--model", start, "--rlhf_type", "dpo",
                 "--train_type", "full", "--learning_rate", "1e-3", "--beta", "0.1", "--num_train_epochs", "8",
                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--warmup_ratio", "0",
                 "--rounds_dir", str(tmp_path / "rounds"), "--judge", "polite", "--judge_samples", "8",
                 "--external_plugins", str(plugin), "--report_to", "none", "--plot", "false",
                 "--seed", str(SEED), "--data_seed", str(SEED)])
    assert code == 0
    report = json.loads((tmp_path / "rounds" / "round-1" / "report.json").read_text())
    assert report["held_out_records"] >= 5 and report["train_rows"] >= 20
    assert report["judged_rate_new"] >= report["judged_rate_last"] + 0.25, report
    assert report["judged_rate_new"] >= 0.7, report
    assert report["accepted"] and report["compared_on"] == "judged_rate"
    if report["held_out_pairs"]:
        assert report["pair_accuracy_new"] >= report["pair_accuracy_last"]
    state = json.loads((tmp_path / "rounds" / "state.json").read_text())
    assert state["current_model"] == report["model"] and len(state["rounds"]) == 1
    assert "preference train: round 1 accepted" in capsys.readouterr().out
