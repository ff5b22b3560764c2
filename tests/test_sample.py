"""``lmforge sample``: N samples per prompt, scored by rewards and a PRM, written for SFT, DPO or as they are."""
from __future__ import annotations

import json
import re

import pytest

PLUGIN = """
from lmforge.registry import REWARDS

@REWARDS.register("num_chars")
def num_chars(completions, solution, **kwargs):
    assert len(solution) == len(completions)  # dataset columns arrive, one per completion
    return [float(len(c)) for c in completions]
"""


def _run(tmp_path, *extra: str, name: str = "out.jsonl") -> tuple[dict, list[dict]]:
    from lmforge.arguments import SampleArguments, parse_args
    from lmforge.pipelines.sample import sample_main

    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    path = tmp_path / name
    argv = ["--model", "builtin:tiny", "--dataset", "builtin:arith-rl#5", "--num_return_sequences", "4",
            "--max_new_tokens", "8", "--external_plugins", str(plugin), "--result_path", str(path), *extra]
    summary = sample_main(parse_args(SampleArguments, argv, prog="lmforge sample"))
    return summary, [json.loads(line) for line in path.read_text().splitlines()]


def test_all_sft_and_dpo_formats_agree(tmp_path):
    summary, rows = _run(tmp_path, "--reward_funcs", "num_chars", "accuracy", "--reward_weights", "1", "10",
                         "--prm", "arith_steps", "--sample_format", "all", name="all.jsonl")
    assert summary["prompts"] == summary["written"] == len(rows) == 5 and summary["samples"] == 20
    row = rows[0]
    assert row["messages"][-1]["role"] == "user" and "solution" in row and len(row["samples"]) == 4
    s = row["samples"][0]
    assert set(s["rewards"]) == {"num_chars", "accuracy"} and isinstance(s["prm"], list)
    # score = num_chars + 10 x accuracy (+ PRM min of judged steps, 0 when none)
    from lmforge.rlhf.prm import aggregate_steps

    for s in row["samples"]:
        assert s["score"] == pytest.approx(s["rewards"]["num_chars"] + 10 * s["rewards"]["accuracy"]
                                           + (aggregate_steps(s["prm"]) or 0.0))
    # the same seed samples the same replies: sft keeps the best of them, dpo pairs best and worst
    _, sft = _run(tmp_path, "--reward_funcs", "num_chars", "accuracy", "--reward_weights", "1", "10",
                  "--prm", "arith_steps", name="sft.jsonl")
    _, dpo = _run(tmp_path, "--reward_funcs", "num_chars", "accuracy", "--reward_weights", "1", "10",
                  "--prm", "arith_steps", "--sample_format", "dpo", name="dpo.jsonl")
    for a, s_row in zip(rows, sft):
        best = max(a["samples"], key=lambda x: x["score"])
        assert s_row["messages"][-1] == {"role": "assistant", "content": best["response"]}
        assert s_row["score"] == best["score"] and s_row["solution"] == a["solution"]
    scores = {r["messages"][0]["content"]: r for r in rows}
    for d in dpo:
        a = scores[d["messages"][0]["content"]]
        assert d["messages"][-1]["content"] == max(a["samples"], key=lambda x: x["score"])["response"]
        assert d["rejected_response"] == min(a["samples"], key=lambda x: x["score"])["response"]
        assert d["score"] > d["rejected_score"]
    # the dpo rows train as they are
    from lmforge.dataset import load_dataset

    loaded, _ = load_dataset([str(tmp_path / "dpo.jsonl")])
    assert loaded[0]["rejected_response"] is not None


def test_min_score_rejects(tmp_path):
    # a random model is never exactly right: with --min_score 1 on strict accuracy every prompt is rejected
    summary, rows = _run(tmp_path, "--reward_funcs", "accuracy", "--min_score", "1",
                         "--reward_kwargs", '{"accuracy": {"strict": true}}')
    assert rows == [] and summary["skipped"] == 5 and summary["written"] == 0


def test_cli_route_and_errors(tmp_path, capsys):
    from lmforge.cli.main import main

    with pytest.raises(SystemExit) as e:  # no reward and no PRM
        main(["sample", "--model", "builtin:tiny", "--dataset", "builtin:arith-rl#2"])
    assert e.value.code == 2 and "no reward" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--model", "builtin:tiny", "--dataset", "x", "--reward_funcs", "accuracy",
              "--sample_format", "dpo", "--num_return_sequences", "1"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 1 + 1?"}], "solution": "2"}) + "\n"
                   + json.dumps({"messages": [{"role": "assistant", "content": "orphan"}]}) + "\n")
    out = tmp_path / "o.jsonl"
    capsys.readouterr()
    assert main(["sample", "--model", "builtin:tiny", "--dataset", str(bad), "--reward_funcs", "accuracy",
                 "--result_path", str(out)]) == 2  # an input error: its message, no traceback
    assert re.search("bad.jsonl:2: nothing to answer.*--strict false", capsys.readouterr().err)
    assert main(["sample", "--model", "builtin:tiny", "--dataset", str(bad), "--reward_funcs", "accuracy",
                 "--strict", "false", "--num_return_sequences", "2", "--max_new_tokens", "4",
                 "--result_path", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 1 and "1 failed" in capsys.readouterr().out
