"""The browser pages without a browser: forms generated from the arguments classes, jobs, chat turns.

Forms: every flag of ``--help`` is in the form with its help text; a flag added to a dataclass appears
without UI code; form values become a command line that the CLI's own parser reads back to the same
arguments; bad values fail with the flag named. Jobs: real ``lmforge`` commands in their own process
groups, found again from their folders, secrets kept off the command line; Stop on a real training
run saves a checkpoint and prints the resume command (slow). Chat: turns over a real builtin:tiny
engine, directly and through ``lmforge``'s own OpenAI-compatible server and the ``openai`` client.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lmforge.arguments import (AppArguments, ArgumentError, EvalArguments, ExportArguments, InferArguments,
                               RlhfArguments, TrainArguments, WebUIArguments, parse_args, to_dict)
from lmforge.arguments.base import build_parser, field
from lmforge.ui import jobs as J
from lmforge.ui.forms import (NONE, command_line, flags_of, form_values, from_widget, parse_flags, split_secrets,
                              to_argv, to_widget)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- forms


@pytest.mark.parametrize("cls", [TrainArguments, RlhfArguments, EvalArguments, ExportArguments, InferArguments,
                                 AppArguments, WebUIArguments])
def test_form_has_every_flag_of_help_with_its_help_text(cls):
    parser = build_parser(cls, "lmforge")
    helps = {a.dest: a.help.replace("%%", "%") for a in parser._actions if a.dest not in ("help", "config", "preset")}
    flags = flags_of(cls)
    assert [f.name for f in flags] == list(helps)  # the same flags, in --help's order
    assert {f.name: f.help for f in flags} == helps
    hidden = {f.name for f in dataclasses.fields(cls) if f.metadata.get("hidden")}
    assert not hidden & {f.name for f in flags}


@dataclasses.dataclass
class _SftWithANewFlag(TrainArguments):
    """sft as it will be once someone adds a flag."""

    shiny_new_flag: int = field(3, "a flag added to the dataclass only")


def test_a_flag_added_to_the_dataclass_appears_in_the_form_and_its_command():
    gr = pytest.importorskip("gradio")
    from lmforge.ui.forms import build_form

    flags = flags_of(_SftWithANewFlag)
    new = next(f for f in flags if f.name == "shiny_new_flag")
    assert (new.kind, new.default, new.help) == ("int", 3, "a flag added to the dataclass only (default: 3)")
    with gr.Blocks():
        shown, components = build_form(gr, flags, prefix="sft", main=["model"])
    by_name = dict(zip([f.name for f in shown], components))
    assert by_name["shiny_new_flag"].elem_id == "sft-shiny_new_flag"
    assert by_name["shiny_new_flag"].info == new.help and by_name["shiny_new_flag"].value == 3
    assert set(by_name) == {f.name for f in flags}  # every flag has a component
    values = {f.name: from_widget(f, to_widget(f, f.default)) for f in flags}
    assert to_argv(flags, values) == []  # defaults everywhere: nothing to type
    values.update(model="builtin:tiny", shiny_new_flag=7)
    argv = to_argv(flags, values)
    assert argv == ["--model", "builtin:tiny", "--shiny_new_flag", "7"]
    assert parse_flags(_SftWithANewFlag, argv).shiny_new_flag == 7


def test_form_values_become_the_command_the_cli_reads_back():
    flags = flags_of(TrainArguments)
    by_name = {f.name: f for f in flags}
    widgets = {  # what a person enters, as the components hand it over
        "model": "builtin:tiny", "dataset": "builtin:self-cognition#40 'my data.jsonl'", "max_steps": 20.0,
        "learning_rate": "2e-4", "per_device_train_batch_size": "2", "train_type": "full",
        "gradient_checkpointing": True, "enable_thinking": "false", "model_kwargs": '{"low_cpu_mem_usage": true}',
        "report_to": "none", "save_total_limit": "", "agent_template": "hermes", "lora_dropout": 0.1,
    }
    values = {name: from_widget(by_name[name], v) for name, v in widgets.items()}
    argv = to_argv(flags, values)
    assert "--save_total_limit" in argv and argv[argv.index("--save_total_limit") + 1] == NONE  # cleared: none
    from_cli = to_dict(parse_args(TrainArguments, argv))
    from_page = to_dict(parse_flags(TrainArguments, argv))
    assert from_cli == from_page
    assert from_cli["dataset"] == ["builtin:self-cognition#40", "my data.jsonl"]
    assert (from_cli["max_steps"], from_cli["learning_rate"], from_cli["per_device_train_batch_size"]) == (20, 2e-4, 2)
    assert from_cli["enable_thinking"] is False and from_cli["gradient_checkpointing"] is True
    assert from_cli["model_kwargs"] == {"low_cpu_mem_usage": True} and from_cli["save_total_limit"] is None
    assert from_cli["report_to"] == ["none"] and from_cli["lora_dropout"] == 0.1
    # and each value shows in its component as the component gives it back
    for name, value in values.items():
        assert from_widget(by_name[name], to_widget(by_name[name], value)) == value, name
    line = command_line("sft", argv)
    assert line.startswith("lmforge sft --model builtin:tiny ")  # flags in --help's order, quoted for a shell
    assert " --dataset 'builtin:self-cognition#40' 'my data.jsonl' " in line


def test_bad_form_values_fail_with_the_flag_named():
    by_name = {f.name: f for f in flags_of(TrainArguments)}
    with pytest.raises(ArgumentError, match="--max_steps: expected a whole number"):
        from_widget(by_name["max_steps"], 2.5)
    with pytest.raises(ArgumentError, match="--learning_rate"):
        from_widget(by_name["learning_rate"], "fast")
    with pytest.raises(ArgumentError, match="--model_kwargs: expected a JSON object"):
        from_widget(by_name["model_kwargs"], "{not json")
    with pytest.raises(ArgumentError, match="--train_type must be one of .*Did you mean 'lora'"):
        parse_flags(TrainArguments, ["--train_type", "loar"])
    with pytest.raises(ArgumentError, match="no reward"):  # the dataclass's own checks run too
        parse_flags(RlhfArguments, ["--rlhf_type", "grpo"])


def test_secret_flags_stay_off_the_command_line():
    flags = flags_of(EvalArguments)
    values = form_values(flags, [to_widget(f, f.default) for f in flags])
    values.update(eval_url="http://127.0.0.1:9/v1", eval_dataset=["builtin:arith"], api_key="sk-very-secret")
    public, hidden = split_secrets(flags, values)
    assert hidden == {"api_key": "sk-very-secret"} and "api_key" not in public
    argv = to_argv(flags, public)
    line = command_line("eval", argv, hidden)
    assert "sk-very-secret" not in line and line.endswith("--api_key '<hidden>'")
    assert parse_flags(EvalArguments, argv, hidden).api_key == "sk-very-secret"


# ----------------------------------------------------------------------------------------------- jobs


def _reports(tmp_path: Path) -> list[str]:
    """Two eval reports as ``lmforge eval`` writes them (what ``eval --compare`` reads)."""
    out = []
    for name, score in (("base", 0.25), ("tuned", 0.75)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "eval_report.json").write_text(json.dumps({"target": name, "datasets": {
            "arith": {"rows": 8, "metrics": {"exact_match": score}, "metric_names": ["exact_match"]}}}))
        out.append(str(folder))
    return out


def _wait_ended(job: J.Job, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while job.state in ("running", "stopping"):
        assert time.monotonic() < deadline, J.log_tail(job)
        time.sleep(0.1)


def test_job_runs_a_real_command_and_is_found_again_from_its_folder(tmp_path, monkeypatch):
    """``lmforge eval --compare`` as a page job: about 5 s."""
    monkeypatch.chdir(tmp_path)
    jobs_dir = tmp_path / "jobs"
    argv = ["--compare", *_reports(tmp_path), "--output_dir", str(tmp_path / "cmp")]
    secrets = {"api_key": "sk-do-not-leak-1234"}
    job = J.start_job(jobs_dir, "eval", argv, display=command_line("eval", argv, secrets),
                      run_dir=str(tmp_path / "cmp"), secret_values=secrets)
    secret_file = job.dir / "secrets.json"
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600  # read by the command, then removed
    assert job.state == "running"
    _wait_ended(job)
    assert job.state == "finished" and job.exit_code == 0
    assert not secret_file.exists()  # removed when the job ended
    for name in ("job.json", "console.log"):
        assert "sk-do-not-leak" not in (job.dir / name).read_text()
    tail = J.log_tail(job)
    assert "| exact_match | 0.2500 | 0.7500 |" in tail
    assert J.result_lines(tail) == [f"eval: comparison (compare_report.json, compare_report.md, compare_report.png) -> "
                                    f"{tmp_path / 'cmp'}"]
    # a fresh page (another process: no child handle) reads the same state from the folder
    J._CHILDREN.clear()
    again = J.load_job(jobs_dir, job.label)  # the dropdown's label names it too
    assert again.state == "finished" and again.info["display"].endswith("--api_key '<hidden>'")
    from lmforge.ui.runs import report_files

    md, png = report_files(again.run_dir)
    assert "| exact_match |" in md and png.endswith("compare_report.png")

    bad = J.start_job(jobs_dir, "eval", ["--compare", str(tmp_path / "missing"), str(tmp_path / "base")],
                      display="lmforge eval ...")
    _wait_ended(bad)
    assert bad.state == "failed" and bad.exit_code == 2
    assert "lmforge eval: error: --compare" in J.log_tail(bad)
    assert [j.id for j in J.list_jobs(jobs_dir)] == [bad.id, job.id]  # newest first
    assert J.list_jobs(jobs_dir, ("sft",)) == []
    assert "is not running" in J.stop_job(bad)


def test_log_tail_progress_and_result_lines(tmp_path):
    folder = tmp_path / "j"
    folder.mkdir()
    job = J.Job(folder, {"command": "sft", "pid": -1})
    (folder / "console.log").write_bytes(b"x" * 300 + b"\nstep 3/20 loss=1\n"
                                         b"Encoding train:  10%| 1/10 [00:01]\rEncoding train: 100%| 10/10 [00:02]\n"
                                         b"step 7/20 loss=0.5 lr=1e-4\nsft: checkpoints, logs and plots -> out/v0\n")
    tail = J.log_tail(job, max_bytes=200)
    assert not tail.startswith("x")  # the cut first line is dropped
    assert "Encoding train: 100%| 10/10" in tail and "10%" not in tail  # a redrawn bar: its last state
    assert J.progress(tail) == (7, 20)
    assert J.progress("Encoding: 40%| 4/10 [00:01<00:02]") == (4, 10)
    assert J.result_lines(tail) == ["sft: checkpoints, logs and plots -> out/v0"]


@pytest.mark.slow
def test_stop_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, monkeypatch):
    """A real ``lmforge sft`` job on builtin:tiny, stopped from the page after its first logged step; about 15 s."""
    monkeypatch.chdir(tmp_path)
    from lmforge.pipelines.sft import resolve_output_dir
    from lmforge.ui.panels import training_prepare

    flags = flags_of(TrainArguments)
    values = {"model": "builtin:tiny", "dataset": ["builtin:self-cognition"], "max_steps": 2000,
              "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "logging_steps": 1,
              "report_to": ["none"]}
    args = parse_flags(TrainArguments, to_argv(flags, values))
    values, run_dir = training_prepare(resolve_output_dir)(args, values)
    assert Path(run_dir).is_dir() and run_dir.startswith("output/builtin-tiny/v0-")  # decided up front
    argv = to_argv(flags, values)
    job = J.start_job(tmp_path / "jobs", "sft", argv, display=command_line("sft", argv), run_dir=run_dir)
    try:
        log = Path(run_dir) / "logging.jsonl"
        deadline = time.monotonic() + 120
        while not log.is_file():
            assert job.state == "running", J.log_tail(job)
            assert time.monotonic() < deadline, J.log_tail(job)
            time.sleep(0.2)
        J._CHILDREN.clear()  # from here on the job is seen as a reloaded page sees it: from its files and /proc
        assert job.state == "running"
        assert J.stop_job(job).startswith(f"Stop sent to {job.id}: training finishes this step, saves a checkpoint")
        assert job.state in ("stopping", "stopped")
        _wait_ended(job)
    finally:
        if job.state in ("running", "stopping"):  # a failed check must not leave 2000 steps running
            os.killpg(job.info["pid"], 9)
    assert job.state == "stopped" and job.exit_code == 130
    tail = J.log_tail(job)
    from lmforge.ui.runs import find_checkpoints

    ckpt = find_checkpoints(run_dir)[0]
    resume = tail.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    assert resume == f"{command_line('sft', argv)} --resume_from_checkpoint {ckpt}"  # the page's command, resumed
    assert (Path(ckpt) / "lmforge_checkpoint.json").is_file()


# ------------------------------------------------------------------------------------- launch checks


def test_auth_from_flag_or_file(tmp_path):
    from lmforge.ui.launch import parse_auth
    from lmforge.utils.log import masked

    assert parse_auth(None) is None
    assert parse_auth("ann:pa:ss-word") == [("ann", "pa:ss-word")]
    assert masked("pa:ss-word") == "***"  # never logged
    f = tmp_path / "users"
    f.write_text("# who may log in\nann:secret-1\n\nbob:secret-2\n")
    assert parse_auth(str(f)) == [("ann", "secret-1"), ("bob", "secret-2")]
    f.write_text("ann:secret-1\nbob\n")
    with pytest.raises(ArgumentError, match=f"{f}:2: expected user:pass"):
        parse_auth(str(f))
    with pytest.raises(ArgumentError, match="no such file"):
        parse_auth(str(tmp_path / "nope" / "users"))
    with pytest.raises(ArgumentError, match="--auth: expected user:pass"):
        parse_auth("ann:")


@pytest.mark.parametrize("command", [["app", "--model", "builtin:tiny"], ["web-ui"]])
def test_a_busy_port_is_one_line_before_anything_loads(command, capsys):
    pytest.importorskip("gradio")
    from lmforge.cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        assert main([*command, "--server_port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"lmforge {command[0]}: error: --server_port {port}: 127.0.0.1:{port} is already in use "
                       "(another server?); stop it or pass another --server_port")
    assert not any("Loading" in line for line in err) and time.monotonic() - start < 5


def test_tools_file_errors_name_the_file(tmp_path):
    from lmforge.pipelines.ui import load_tools

    f = tmp_path / "tools.json"
    f.write_text('[{"type": "function", "function": {"name": "add"}}]')
    assert load_tools(str(f))[0]["function"]["name"] == "add"
    f.write_text('{"type": "function",')
    with pytest.raises(ValueError, match=f"--tools {f}: tools: not JSON"):
        load_tools(str(f))
    f.write_text('["add"]')
    with pytest.raises(ValueError, match="expected a list of objects"):
        load_tools(str(f))
    with pytest.raises(OSError, match="--tools .*missing.json: No such file"):
        load_tools(str(tmp_path / "missing.json"))


def test_app_arguments_need_something_to_chat_with():
    with pytest.raises(SystemExit):
        parse_args(AppArguments, [])
    with pytest.raises(ArgumentError, match="--base_url chats with a server"):
        AppArguments(base_url="http://127.0.0.1:9/v1", ckpt_dir="out/checkpoint-5")
    assert AppArguments(model="builtin:tiny").server_name == "127.0.0.1"  # loopback unless asked


# ----------------------------------------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def tiny_engine():
    from lmforge.infer.hf import HfEngine

    return HfEngine("builtin:tiny", device="cpu", max_batch_size=4)


def test_a_turn_streams_and_adds_up_to_the_engine_reply(tiny_engine):
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.ui.chat import ChatSettings, engine_responder, run_turn

    conv = [{"role": "user", "content": "What is 2+3?"}]
    settings = ChatSettings(max_new_tokens=16, stop=[])
    states = list(run_turn(engine_responder(tiny_engine), conv, "", settings))
    display, final = states[-1]
    want = tiny_engine.infer([InferRequest(messages=conv)], RequestConfig(max_tokens=16))[0].choices[0].message
    assert final == [*conv, {"role": "assistant", "content": want.content}]
    assert display[-1] == {"role": "assistant", "content": want.content}
    shown = [d[-1]["content"] for d, _ in states[1:]]
    assert all(want.content.startswith(s) for s in shown)


def test_a_turn_sends_the_system_prompt_and_the_history_it_is_asked_to():
    from lmforge.ui.chat import ChatSettings, run_turn

    seen = []

    def respond(messages, settings):  # a responder is any function of this shape (the agents' hook)
        seen.append(messages)
        yield {"text": "ok"}

    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    final = list(run_turn(respond, conv, "Be brief.", ChatSettings()))[-1][1]
    assert seen[-1] == [{"role": "system", "content": "Be brief."}, *conv] and final == [*conv, {
        "role": "assistant", "content": "ok"}]
    list(run_turn(respond, conv, "  ", ChatSettings(), keep_history=False))
    assert seen[-1] == [conv[-1]]  # each message on its own; a blank system prompt is not sent


def test_an_engine_error_is_shown_and_the_question_kept_for_regenerate(tiny_engine):
    from lmforge.ui.chat import ChatSettings, _trim_reply, engine_responder, run_turn

    conv = [{"role": "user", "content": "7 " * 3000}]
    display, final = list(run_turn(engine_responder(tiny_engine), conv, "", ChatSettings(max_new_tokens=4)))[-1]
    assert final == conv
    assert display[-1]["metadata"] == {"title": "Error"}
    assert display[-1]["content"].startswith("PromptTooLongError: the prompt is ")
    assert display[-1]["content"].endswith(f"but max_model_len is {tiny_engine.max_model_len}; shorten the "
                                           "conversation or raise --max_model_len")
    assert _trim_reply([*conv, {"role": "assistant", "content": "x"}]) == conv
    assert list(run_turn(None, conv, "", ChatSettings()))[-1][0][-1]["content"] == "No model loaded yet."


def test_tool_calls_and_results_are_shown_as_their_own_messages():
    from lmforge.ui.chat import apply_event, to_display

    conv = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": ""}]
    call = {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    for event in ({"text": "Let me look."}, {"tool_calls": [call]},
                  {"tool_result": {"tool_call_id": "call-1", "name": "get_weather", "content": "18 C"}},
                  {"text": "It is 18 C."}):
        apply_event(conv, event)
    assert [m["role"] for m in conv] == ["user", "assistant", "tool", "assistant"]
    assert conv[1]["tool_calls"] == [call]
    shown = to_display(conv)
    assert [m.get("metadata", {}).get("title") for m in shown] == [
        None, None, "Tool call: get_weather", "Tool result: get_weather", None]
    assert '"city": "Paris"' in shown[2]["content"] and shown[-1]["content"] == "It is 18 C."


def test_openai_responder_over_lmforges_own_server(tiny_engine):
    import openai

    from lmforge.arguments import DeployArguments
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.serve import create_app
    from lmforge.serve.server import ServerThread
    from lmforge.ui.chat import ChatSettings, openai_responder, run_turn

    conv = [{"role": "user", "content": "Hello there"}]
    want = tiny_engine.infer([InferRequest(messages=conv)], RequestConfig(max_tokens=12))[0].choices[0].message.content
    with ServerThread(create_app(tiny_engine, DeployArguments(max_new_tokens=12))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        respond = openai_responder(client, "builtin:tiny")
        for stream in (True, False):
            states = list(run_turn(respond, conv, "", ChatSettings(max_new_tokens=12, stream=stream)))
            assert states[-1][1][-1] == {"role": "assistant", "content": want}
        # top_k and repetition_penalty are not OpenAI parameters: they travel in the body's extras
        sampled = list(run_turn(respond, conv, "", ChatSettings(max_new_tokens=12, top_k=1, repetition_penalty=1.0)))
        assert sampled[-1][1][-1]["content"] == want  # top_k 1 is greedy
        from lmforge.pipelines.ui import _server_responder

        _, name = _server_responder(AppArguments(base_url=srv.url + "/v1"))
        assert name == "builtin:tiny"  # the server's first model when --model is not given
    with pytest.raises(ConnectionError, match=f"--base_url {srv.url}/v1: cannot list the served models"):
        _server_responder(AppArguments(base_url=srv.url + "/v1"))  # the server has gone: said before the page


class _ToolCallServer(BaseHTTPRequestHandler):
    """Streams one reply the way OpenAI does: a tool call's name and arguments in pieces over several chunks."""

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["tools"][0]["function"]["name"] == "get_weather" and body["stream"] is True
        pieces = [{"role": "assistant", "content": "Checking."},
                  {"tool_calls": [{"index": 0, "id": "call-9", "type": "function",
                                   "function": {"name": "get_", "arguments": ""}}]},
                  {"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": '{"city": '}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i, delta in enumerate(pieces):
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": delta,
                                  "finish_reason": "tool_calls" if i == len(pieces) - 1 else None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


def test_openai_responder_joins_streamed_tool_call_pieces():
    import openai

    from lmforge.ui.chat import ChatSettings, openai_responder, to_display

    server = ThreadingHTTPServer(("127.0.0.1", 0), _ToolCallServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="k", max_retries=0)
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        events = list(openai_responder(client, "m")([{"role": "user", "content": "Oslo?"}], ChatSettings(tools=tools)))
    finally:
        server.shutdown()
    assert events == [{"text": "Checking."}, {"tool_calls": [{"id": "call-9", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]
    conv = [{"role": "assistant", "content": "Checking.", "tool_calls": events[1]["tool_calls"]}]
    assert to_display(conv)[1]["metadata"]["title"] == "Tool call: get_weather"


def test_the_webui_page_builds_every_tab_from_the_arguments(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    monkeypatch.chdir(tmp_path)
    from lmforge.ui.webui import Hooks, build_webui

    hooks = Hooks(train_run_dir=lambda a: "unused", eval_output_dir=lambda a: "unused", build_engine=lambda a: None)
    demo = build_webui(WebUIArguments(), hooks)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    for prefix, cls in (("sft", TrainArguments), ("rlhf", RlhfArguments), ("eval", EvalArguments),
                        ("export", ExportArguments)):
        want = {f"{prefix}-{f.name}" for f in flags_of(cls)} - {"eval-compare"}
        assert want <= ids, sorted(want - ids)
    assert {"chat-model", "chat-ckpt_dir", "chat-adapters", "chat-chatbot", "sft-loss-plot", "sft-lr-plot"} <= ids


def test_the_ui_layer_imports_no_command_or_sibling_package():
    """``ui/`` sits beside eval/serve/rlhf, below the pipelines: what it needs from them is handed in."""
    import ast

    for path in (ROOT / "lmforge" / "ui").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("lmforge.pipelines", "lmforge.cli", "lmforge.eval", "lmforge.rlhf",
                                            "lmforge.serve", "lmforge.export", "lmforge.agents")), (path, name)


def test_without_gradio_the_pages_say_how_to_get_it(monkeypatch, capsys):
    import importlib.util

    from lmforge.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["web-ui"]) == 2
    assert capsys.readouterr().err.strip() == ("lmforge web-ui: error: the browser pages need gradio: "
                                               "pip install 'lmforge[ui]'")
