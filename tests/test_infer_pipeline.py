"""``lmforge infer``: batch mode into a JSONL (bad rows reported, the rest answered) and the terminal chat."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading

import pytest

from lmforge.arguments import InferArguments
from test_infer_hf import make_lora_checkpoint

GOOD = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        "solution": "4"}
ROWS = [
    json.dumps(GOOD),
    json.dumps({"messages": []}),
    json.dumps({"messages": [{"role": "robot", "content": "beep"}]}),
    "this is not json",
    json.dumps({"messages": [{"role": "assistant", "content": "a reply to nothing"}]}),
    json.dumps({"messages": [{"role": "user", "content": "word " * 200}]}),
    json.dumps({"messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}],
                "solution": None}),
]


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_batch_reports_bad_rows_and_answers_the_rest(tmp_path):
    from lmforge.pipelines.infer import infer_main

    data = tmp_path / "val.jsonl"
    data.write_text("\n".join(ROWS) + "\n", encoding="utf-8")
    out = tmp_path / "result.jsonl"
    summary = infer_main(InferArguments(model="builtin:tiny", val_dataset=[str(data)], result_path=str(out),
                                        max_new_tokens=5, max_model_len=128, max_batch_size=2))
    lines = _read(out)
    assert len(lines) == len(ROWS)
    errors = {i: line["error"] for i, line in enumerate(lines) if "error" in line}
    assert sorted(errors) == [1, 2, 3, 4, 5]
    assert "val.jsonl:2" in errors[1] and "empty message list" in errors[1]
    assert "val.jsonl:3" in errors[2] and "unknown role 'robot'" in errors[2]
    assert "invalid JSON" in errors[3]
    assert "only message is an assistant reply" in errors[4]
    assert "max_model_len is 128" in errors[5]
    first, last = lines[0], lines[6]
    assert first["messages"] == [{"role": "user", "content": "What is 2+2?"}]
    assert first["reference"] == "4" and first["solution"] == "4" and isinstance(first["response"], str)
    assert first["finish_reason"] in ("stop", "length") and first["usage"]["completion_tokens"] <= 5
    assert last["reference"] is None and last["messages"][0]["role"] == "system"
    assert summary["rows"] == 7 and summary["errors"] == 5 and summary["answered"] == 2
    assert summary["completion_tokens"] == first["usage"]["completion_tokens"] + last["usage"]["completion_tokens"]
    assert summary["tokens_per_second"] > 0 and summary["result_path"] == str(out)


def test_batch_on_a_builtin_dataset_with_a_checkpoint(tmp_path, capsys):
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine
    from lmforge.pipelines.infer import infer_main

    ckpt = make_lora_checkpoint(tmp_path / "run")
    summary = infer_main(InferArguments(ckpt_dir=str(ckpt), dataset=["builtin:arith:test#3"], max_new_tokens=6))
    # the output rule: infer-<checkpoint>-<time>.jsonl in the checkpoint's run folder
    assert summary["result_path"].startswith(str(ckpt.parent / "infer-checkpoint-5-"))
    assert summary["result_path"].endswith(".jsonl")
    assert "3 rows (0 errors)" in capsys.readouterr().out
    lines = _read(summary["result_path"])
    assert len(lines) == 3 and all(line["solution"] and line["reference"] for line in lines)
    # answered with the checkpoint's adapter and system prompt
    engine = HfEngine(ckpt_dir=str(ckpt), device="cpu")
    expected = engine.infer([InferRequest(messages=lines[0]["messages"], adapter="checkpoint-5")],
                            RequestConfig(max_tokens=6))[0]
    assert lines[0]["response"] == expected.choices[0].message.content


class _Lines:
    """Scripted terminal input; ``None`` raises Ctrl-C at the prompt."""

    def __init__(self, lines):
        self.lines = list(lines)
        self.prompts = []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if line is None:
            raise KeyboardInterrupt
        return line


class _CtrlCInFirstReply(io.StringIO):
    """A terminal whose user presses Ctrl-C as soon as the first reply starts printing."""

    def __init__(self):
        super().__init__()
        self.state = "before"

    def write(self, s):
        if self.state == "before" and s == ">>> ":
            self.state = "armed"
        elif self.state == "armed":
            self.state = "done"
            raise KeyboardInterrupt
        return super().write(s)


@pytest.fixture(scope="module")
def tiny_engine():
    from lmforge.infer.hf import HfEngine

    return HfEngine("builtin:tiny", device="cpu")


def test_chat_history_multiline_clear_and_ctrl_c(tiny_engine):
    from lmforge.infer import RequestConfig
    from lmforge.pipelines.infer import chat

    lines = _Lines(["first", None, "line one\\", "line two", '"""', "block a", "block b", '"""', "clear",
                    "after clear", "exit", "never read"])
    out = _CtrlCInFirstReply()
    history = chat(tiny_engine, RequestConfig(max_tokens=40), read_line=lines, out=out)
    text = out.getvalue()
    assert "(stopped)" in text and "(Ctrl-D or 'exit' quits)" in text and "(conversation cleared)" in text
    assert [m["content"] for m in history if m["role"] == "user"] == ["after clear"]
    assert len(history) == 2 and history[1]["role"] == "assistant"
    assert lines.lines == ["never read"] and lines.prompts.count("... ") == 4
    assert not [t for t in threading.enumerate() if t.name == "lmforge-generate"]  # Ctrl-C stopped generation


def test_chat_errors_do_not_end_the_session(tiny_engine):
    from lmforge.infer import RequestConfig
    from lmforge.pipelines.infer import chat

    out = io.StringIO()
    long_prompt = "word " * 1100
    history = chat(tiny_engine, RequestConfig(max_tokens=3), read_line=_Lines([long_prompt, "short"]), out=out,
                   stream=False)
    assert "max_model_len is 1024" in out.getvalue()
    assert history[0]["content"] == "short" and len(history) == 2


def test_cli_chat_from_a_pipe(tmp_path):
    env = {**os.environ, "LMFORGE_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.cli.main", "infer", "--model", "builtin:tiny", "--max_new_tokens", "3",
         "--torch_dtype", "float32"],
        input="hello\nclear\nbye\n", capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(">>> ") == 2 and "(conversation cleared)" in proc.stdout
    assert "Traceback" not in proc.stderr
