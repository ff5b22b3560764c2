"""lmforge eval: datasets, resumable runs, reports, comparisons, engine vs server, the CLI, harness hooks."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.arguments import ArgumentError, EvalArguments
from lmforge.eval.data import load_eval_set, resolve_spec
from lmforge.infer.protocol import ChatCompletionResponse, ChatMessage, Choice, Usage
from lmforge.pipelines.eval import eval_main


class FakeEngine:
    """Answers 'What is a op b?' rightly when ``a`` is even, else off by one; can stop after N rows."""

    model_name = "fake"
    adapters: dict = {}

    def __init__(self, stop_after: int | None = None):
        self.answered: list[str] = []
        self.stop_after = stop_after

    def _reply(self, question: str) -> str:
        a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", question).groups()
        value = eval(f"{a}{op}{b}")  # noqa: S307 - our own arithmetic strings
        return f"The answer is {value if int(a) % 2 == 0 else value + 1}"

    def infer(self, requests, config=None, *, use_tqdm=None):
        out = []
        for r in requests:
            if self.stop_after is not None and len(self.answered) >= self.stop_after:
                raise KeyboardInterrupt
            q = r.messages[-1].content
            self.answered.append(q)
            out.append(ChatCompletionResponse(model="fake", usage=Usage(), choices=[
                Choice(index=0, message=ChatMessage(role="assistant", content=self._reply(q)), finish_reason="stop")]))
        return out


def expected_accuracy(rows: list[dict]) -> float:
    return sum(int(re.search(r"(\d+)", r["messages"][0]["content"]).group(1)) % 2 == 0 for r in rows) / len(rows)


def arith_rows(n: int) -> list[dict]:
    from lmforge.dataset import generate_arith

    return generate_arith(split="test")[:n]


def args_for(tmp_path: Path, **kw) -> EvalArguments:
    base = dict(model="fake", eval_dataset=["builtin:arith"], eval_limit=10, output_dir=str(tmp_path / "run"),
                max_batch_size=3, plot=False)
    return EvalArguments(**{**base, **kw})


# ------------------------------------------------------------------------------------- datasets


def test_builtin_arith_is_the_held_out_split():
    from lmforge.dataset.builtin import arith_in_test_split

    assert resolve_spec("builtin:arith") == "builtin:arith:test"
    assert resolve_spec("builtin:arith#50") == "builtin:arith:test#50"
    assert resolve_spec("builtin:arith:train") == "builtin:arith:train"
    assert resolve_spec("builtin:arith-rl") == "builtin:arith-rl:test"  # GRPO's prompt set: same held-out rows
    rl = load_eval_set("builtin:arith-rl", mc_generate=True, limit=5)
    assert rl.source == "builtin:arith-rl:test" and all(str(it.reference).lstrip("-").isdigit() for it in rl.items)
    ds = load_eval_set("builtin:arith", mc_generate=True, limit=30)
    assert ds.source == "builtin:arith:test" and len(ds.items) == 30
    for it in ds.items:
        a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", it.messages[0]["content"]).groups()
        assert arith_in_test_split(int(a), op, int(b))
        assert it.messages[-1]["role"] == "user" and str(it.reference).lstrip("-").isdigit()


def test_local_jsonl_rows_references_and_bad_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"question": "Capital of Italy?", "answer": "Rome"},
        {"query": "3+3?", "response": "six", "solution": "6"},  # the column beats the reply
        {"question": "Which is a fruit?", "choices": ["car", "apple"], "answer": 1},
        {"messages": [{"role": "user", "content": "no reference"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n", encoding="utf-8")
    ds = load_eval_set(str(path), mc_generate=True)
    refs = [it.reference for it in ds.items]
    assert refs[:4] == ["4", "Rome", "6", 1]
    assert ds.items[1].messages == [{"role": "user", "content": "Capital of Italy?"}]
    assert "A. car\nB. apple" in ds.items[3].messages[-1]["content"]  # listed for a generated answer
    assert ds.items[4].error and "no reference" in ds.items[4].error
    assert ds.items[5].error and "invalid JSON" in ds.items[5].error and ":6" in ds.items[5].error
    ll = load_eval_set(str(path), mc_generate=False)
    assert ll.items[3].messages == [{"role": "user", "content": "Which is a fruit?"}]  # as given
    assert ll.items[3].key != ds.items[3].key
    keys = [it.key for it in ds.items]
    assert len(set(keys)) == len(keys) and keys[0].startswith(f"{path}:0:")


# ------------------------------------------------------------------------------- runs and resume


def test_engine_eval_report_files(tmp_path):
    report = eval_main(args_for(tmp_path, plot=True), engine=FakeEngine())
    out = tmp_path / "run"
    acc = expected_accuracy(arith_rows(10))
    ds = report["datasets"]["builtin:arith"]
    assert ds["metrics"] == {"accuracy": pytest.approx(acc)} and ds["rows"] == 10 and ds["metric_names"] == ["numeric"]
    saved = json.loads((out / "eval_report.json").read_text())
    assert saved["datasets"]["builtin:arith"]["metrics"]["accuracy"] == pytest.approx(acc)
    md = (out / "eval_report.md").read_text()
    assert "## builtin:arith" in md and f"| accuracy | {acc:.4f} |" in md
    assert (out / "eval_report.png").stat().st_size > 1000
    lines = [json.loads(x) for x in (out / "predictions" / "builtin_arith.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(10))
    first = lines[0]
    assert first["response"].startswith("The answer is") and first["extracted"]["numeric"] in first["response"]
    assert first["scores"]["accuracy"] in (0.0, 1.0) and first["key"].startswith("builtin:arith:0:")


def test_interrupted_eval_resumes_where_it_stopped(tmp_path):
    args = args_for(tmp_path, eval_limit=11)
    with pytest.raises(KeyboardInterrupt):
        eval_main(args, engine=FakeEngine(stop_after=7))  # batches of 3: rows 0-5 are written, 6-7 lost
    cached = (tmp_path / "run" / "predictions" / "builtin_arith.jsonl").read_text().splitlines()
    assert len(cached) == 6
    again = FakeEngine()
    report = eval_main(args, engine=again)
    assert len(again.answered) == 5  # only the rows not answered before
    assert report["datasets"]["builtin:arith"]["metrics"]["accuracy"] == pytest.approx(expected_accuracy(arith_rows(11)))
    third = FakeEngine()
    eval_main(args, engine=third)
    assert third.answered == []  # everything cached
    fresh = FakeEngine()
    eval_main(args_for(tmp_path, eval_limit=11, eval_resume=False), engine=fresh)
    assert len(fresh.answered) == 11


def test_answers_of_another_model_are_not_mixed_in(tmp_path):
    eval_main(args_for(tmp_path), engine=FakeEngine())
    with pytest.raises(ValueError, match="another run.*eval_resume false"):
        eval_main(args_for(tmp_path, model="other", max_new_tokens=7), engine=FakeEngine())
    with pytest.raises(ValueError, match="max_new_tokens"):
        eval_main(args_for(tmp_path, max_new_tokens=7), engine=FakeEngine())


def test_metrics_per_dataset_and_a_plugin_metric(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"What is {a} + {a}?", "answer": f"The answer is {2 * a}"})
                              for a in range(6)), encoding="utf-8")
    plugin = tmp_path / "eval_plugin_says_answer.py"
    plugin.write_text("from lmforge.registry import EVAL_METRICS\n"
                      "@EVAL_METRICS.register('says_answer')\n"
                      "def says_answer(prediction, reference, row):\n"
                      "    return 'answer' in prediction\n")
    report = eval_main(args_for(tmp_path, eval_dataset=["builtin:arith", str(data)],
                                eval_metric=["numeric", "exact_match,rouge,says_answer,bleu"],
                                external_plugins=[str(plugin)]), engine=FakeEngine())
    qa = report["datasets"][str(data)]["metrics"]
    assert qa["exact_match"] == pytest.approx(3 / 6)  # a = 0, 2, 4 answered rightly, word for word
    assert qa["says_answer"] == 1.0 and 0.5 < qa["rouge1"] < 1.0 and 0 < qa["bleu"] < 1.0
    assert set(qa) == {"exact_match", "rouge1", "rouge2", "rougeL", "says_answer", "bleu"}
    auto = eval_main(args_for(tmp_path, eval_dataset=[str(data)], output_dir=str(tmp_path / "auto")),
                     engine=FakeEngine())
    assert auto["datasets"][str(data)]["metric_names"] == ["exact_match", "rouge"]  # references are sentences


def test_compare_reports_side_by_side(tmp_path, capsys):
    from lmforge.eval.report import compare_reports

    eval_main(args_for(tmp_path, output_dir=str(tmp_path / "base"), eval_limit=4), engine=FakeEngine())
    eval_main(args_for(tmp_path, output_dir=str(tmp_path / "sft")), engine=FakeEngine())
    cmp = eval_main(EvalArguments(compare=[f"base={tmp_path / 'base'}", str(tmp_path / "sft" / "eval_report.json")],
                                  output_dir=str(tmp_path / "cmp")))
    printed = capsys.readouterr().out
    assert cmp["runs"] == ["base", "sft"]
    a4, a10 = expected_accuracy(arith_rows(4)), expected_accuracy(arith_rows(10))
    assert f"| accuracy | {a4:.4f} | {a10:.4f} |" in printed
    assert "| rows | 4 | 10 |" in printed
    for name in ("compare_report.md", "compare_report.json", "compare_report.png"):
        assert (tmp_path / "cmp" / name).is_file()
    with pytest.raises(FileNotFoundError, match="eval_report.json"):
        compare_reports([str(tmp_path / "nowhere")])


# ----------------------------------------------------------------------------- real model, server


@pytest.fixture(scope="module")
def tiny_engine():
    from lmforge.infer.hf import HfEngine

    return HfEngine("builtin:tiny", device="cpu", max_batch_size=8)


def test_multiple_choice_loglikelihood_matches_a_direct_forward(tmp_path, tiny_engine):
    import torch

    from lmforge.eval.loglikelihood import continuation_logprobs
    from lmforge.infer.convert import parse_request

    req = parse_request({"messages": [{"role": "user", "content": "Pick a colour."}]})
    lps = continuation_logprobs(tiny_engine, req, ["red", "a shade of blue"])
    prompt = tiny_engine.encode(req)
    cont = tiny_engine.tokenizer("a shade of blue", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = tiny_engine.model(input_ids=torch.tensor([prompt + cont])).logits[0].float()
    direct = sum(torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t].item() for i, t in enumerate(cont))
    assert lps[1] == pytest.approx(direct, abs=1e-4)

    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"Q{i}?", "choices": ["yes", "no", "maybe"], "answer": "B"})
                              for i in range(3)), encoding="utf-8")
    rep = eval_main(args_for(tmp_path, model="builtin:tiny", eval_dataset=[str(data)], max_new_tokens=4),
                    engine=tiny_engine)
    ds = rep["datasets"][str(data)]
    assert ds["mc_mode"] == "loglikelihood" and set(ds["metrics"]) == {"accuracy", "accuracy_norm"}
    rows = [json.loads(x) for x in (tmp_path / "run" / "predictions" / "mc.jsonl").read_text().splitlines()]
    assert all(len(r["choice_logprobs"]) == 3 and r["response"] in "ABC" for r in rows)
    gen = eval_main(args_for(tmp_path, model="builtin:tiny", eval_dataset=[str(data)], max_new_tokens=4,
                             eval_mc_mode="generate", output_dir=str(tmp_path / "gen")), engine=tiny_engine)
    assert gen["datasets"][str(data)]["mc_mode"] == "generate"
    assert set(gen["datasets"][str(data)]["metrics"]) == {"accuracy"}


def test_engine_and_server_agree_on_an_untrained_model(tmp_path, tiny_engine):
    """Greedy answers through the server (concurrent requests) are the engine's, row for row."""
    from lmforge.arguments import DeployArguments
    from lmforge.serve import create_app
    from lmforge.serve.server import ServerThread

    common = dict(eval_limit=12, max_new_tokens=6)
    local = eval_main(args_for(tmp_path, model="builtin:tiny", output_dir=str(tmp_path / "engine"), **common),
                      engine=tiny_engine)
    with ServerThread(create_app(tiny_engine, DeployArguments(api_key="sk-eval"))) as srv:
        remote = eval_main(args_for(tmp_path, model=None, eval_url=srv.url + "/v1", api_key="sk-eval",
                                    eval_concurrency=4, output_dir=str(tmp_path / "server"), **common))
        with pytest.raises(ConnectionError, match="API key"):  # a wrong key fails before any row is sent
            eval_main(args_for(tmp_path, model=None, eval_url=srv.url, api_key="wrong", output_dir=str(tmp_path / "x")))
        denied = eval_main(args_for(tmp_path, model=tiny_engine.model_name, eval_url=srv.url, api_key="wrong",
                                    eval_limit=2, output_dir=str(tmp_path / "denied")))
    assert local["datasets"]["builtin:arith"]["metrics"] == remote["datasets"]["builtin:arith"]["metrics"]
    read = lambda d: [json.loads(x)["response"] for x in  # noqa: E731
                      (tmp_path / d / "predictions" / "builtin_arith.jsonl").read_text().splitlines()]
    assert read("engine") == read("server")
    assert denied["datasets"]["builtin:arith"]["errors"] == 2  # 401: recorded per row, the run finishes


# ------------------------------------------------------------------------------------------- CLI


def test_cli_help_and_argument_errors():
    out = subprocess.run([sys.executable, "-m", "lmforge.cli.main", "eval", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--eval_dataset" in out.stdout and "--compare" in out.stdout
    listed = subprocess.run([sys.executable, "-m", "lmforge.cli.main", "--help"], capture_output=True, text=True)
    assert "eval " in listed.stdout
    with pytest.raises(ArgumentError, match="eval_dataset"):
        EvalArguments(model="m")
    with pytest.raises(ArgumentError, match="one per dataset"):
        EvalArguments(model="m", eval_dataset=["a", "b", "c"], eval_metric=["bleu", "rouge"])
    with pytest.raises(ArgumentError, match="eval_url"):
        EvalArguments(eval_dataset=["builtin:arith"])


# --------------------------------------------------------------------------------------- harness


def test_lm_eval_and_evalscope_commands_target_our_server(tmp_path):
    from lmforge.eval.harness import evalscope_command, lm_eval_command

    cmd = lm_eval_command("http://127.0.0.1:8000/v1", "tiny", ["gsm8k", "arc_easy"], output_path=tmp_path,
                          include_path=tmp_path / "tasks", limit=5, num_concurrent=4, max_gen_toks=64,
                          launcher=["lm_eval"])
    assert cmd[:3] == ["lm_eval", "--model", "local-chat-completions"]
    model_args = dict(kv.split("=", 1) for kv in cmd[4].split(","))
    assert model_args == {"model": "tiny", "base_url": "http://127.0.0.1:8000/v1/chat/completions",
                          "num_concurrent": "4", "max_retries": "3", "tokenized_requests": "False", "max_gen_toks": "64"}
    assert cmd[5:7] == ["--tasks", "gsm8k,arc_easy"] and "--apply_chat_template" in cmd
    assert cmd[cmd.index("--include_path") + 1] == str(tmp_path / "tasks") and cmd[-2:] == ["--limit", "5"]
    es = evalscope_command("http://127.0.0.1:8000", "tiny", ["gsm8k"], work_dir=tmp_path, limit=3,
                           launcher=["evalscope"])
    assert es[:4] == ["evalscope", "eval", "--model", "tiny"]
    assert es[es.index("--api-url") + 1] == "http://127.0.0.1:8000/v1"
    assert es[es.index("--eval-type") + 1] == "openai_api" and es[-2:] == ["--limit", "3"]


def test_lm_eval_runs_a_local_task_against_our_server(tmp_path, tiny_engine):
    """The real lm-evaluation-harness, a task YAML over a local JSONL, no download (skipped if not installed)."""
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "arith.jsonl"
    rows = arith_rows(6)
    data.write_text("\n".join(json.dumps({"question": r["messages"][0]["content"], "answer": r["solution"]})
                              for r in rows), encoding="utf-8")
    (tasks / "lmforge_arith.yaml").write_text(
        "task: lmforge_arith\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: []\n  max_gen_toks: 6\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8")
    report = eval_main(args_for(tmp_path, model="builtin:tiny", eval_backend="lm_eval", eval_dataset=["lmforge_arith"],
                                eval_include_path=str(tasks), max_new_tokens=6, output_dir=str(tmp_path / "lm")),
                       engine=tiny_engine)
    ds = report["datasets"]["lmforge_arith"]
    assert ds["rows"] == 6 and "exact_match" in ds["metrics"] and 0.0 <= ds["metrics"]["exact_match"] <= 1.0
    assert (tmp_path / "lm" / "eval_report.md").is_file()
