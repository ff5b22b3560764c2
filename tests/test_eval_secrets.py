"""``lmforge eval --api_key`` with the lm_eval and evalscope hooks: the key reaches the tool (it talks to a
keyed server with it) but no command line, log line, output line or file of the run.

The tools are not installed here, so small stand-ins are installed into a temporary folder: real
distributions with the real names and entry points, started by the real hook code (the command and
environment lmforge builds). Like a careless real tool, each prints the key it was given; the test
checks that lmforge's pass-through masks it. Each stand-in records its own ``/proc/self/cmdline``
(what ``ps`` shows other users) and whether its request with the key was accepted.
"""
from __future__ import annotations

import importlib
import json
import logging
import textwrap

import pytest

from lmforge.arguments import EvalArguments
from test_serve_support import echo_server

KEY = "sk-test-8f3a91c2d4e5b6a7"

_COMMON = '''
import json, os, sys, urllib.request

def check(base_url, key):
    req = urllib.request.Request(base_url.rstrip("/") + "/models", headers={"Authorization": "Bearer " + key})
    try:
        return urllib.request.urlopen(req, timeout=30).status == 200
    except Exception:
        return False

def record(path, **extra):
    cmdline = open("/proc/self/cmdline", "rb").read().decode().split("\\0")
    json.dump({"argv": sys.argv, "cmdline": cmdline, **extra}, open(path, "w"))
'''

_EVALSCOPE = _COMMON + '''
def run_cmd():
    args = sys.argv
    key = args[args.index("--api-key") + 1] if "--api-key" in args else ""
    print("evalscope: task config", {"api_key": key, "argv": args}, flush=True)
    ok = check(args[args.index("--api-url") + 1], key)
    work = args[args.index("--work-dir") + 1]
    os.makedirs(os.path.join(work, "reports", "m"), exist_ok=True)
    json.dump({"dataset_name": "fake_task", "metrics": [{"name": "acc", "score": 1.0 if ok else 0.0, "num": 1}]},
              open(os.path.join(work, "reports", "m", "fake_task.json"), "w"))
    record(os.environ["FAKE_RECORD"], ok=ok, inherited_key_env="LMFORGE_EVAL_API_KEY" in os.environ)
    return 0
'''

_LM_EVAL = _COMMON + '''
args = sys.argv
key = os.environ.get("OPENAI_API_KEY", "")
print("lm_eval: using key", key, flush=True)
model_args = dict(kv.split("=", 1) for kv in args[args.index("--model_args") + 1].split(","))
ok = check(model_args["base_url"].rsplit("/chat/completions", 1)[0], key)
out = args[args.index("--output_path") + 1]
os.makedirs(out, exist_ok=True)
json.dump({"results": {"fake_task": {"alias": "fake_task", "acc,none": 1.0 if ok else 0.0}},
           "n-samples": {"fake_task": {"effective": 1}}}, open(os.path.join(out, "results_1.json"), "w"))
record(os.environ["FAKE_RECORD"], ok=ok)
'''


@pytest.fixture()
def fake_tools(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "evalscope").mkdir(parents=True)
    (site / "evalscope" / "__init__.py").write_text("")
    (site / "evalscope" / "cli.py").write_text(textwrap.dedent(_EVALSCOPE))
    info = site / "evalscope-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evalscope\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[console_scripts]\nevalscope = evalscope.cli:run_cmd\n")
    (site / "lm_eval").mkdir()
    (site / "lm_eval" / "__init__.py").write_text("")
    (site / "lm_eval" / "__main__.py").write_text(textwrap.dedent(_LM_EVAL))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("FAKE_RECORD", str(tmp_path / "record.json"))
    importlib.invalidate_caches()
    return tmp_path / "record.json"


@pytest.mark.parametrize("backend", ["evalscope", "lm_eval"])
def test_api_key_reaches_the_tool_but_no_command_line_or_log(tmp_path, fake_tools, capfd, caplog, backend):
    from lmforge.pipelines.eval import eval_main

    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    with echo_server(api_key=KEY) as srv:
        report = eval_main(EvalArguments(eval_url=srv.url, api_key=KEY, eval_backend=backend,
                                         eval_dataset=["fake_task"], output_dir=str(out), plot=False))
    record = json.loads(fake_tools.read_text())
    assert record["ok"] and report["datasets"]["fake_task"]["metrics"]  # the key worked inside the tool
    assert not any(KEY in part for part in record["cmdline"]), record["cmdline"]  # what `ps` shows
    if backend == "evalscope":
        assert record["argv"][-2:] == ["--api-key", KEY]  # handed over in the child's memory
        assert not record["inherited_key_env"]  # and not left in the environment its own children inherit
    printed = capfd.readouterr()
    text = printed.out + printed.err
    assert "***" in text and KEY not in text  # the tool printed the key; the pass-through masked it
    logged = [r.getMessage() for r in caplog.records]
    assert any("running: " in m for m in logged) and not any(KEY in m for m in logged)
    for f in out.rglob("*"):
        assert not f.is_file() or KEY not in f.read_text(errors="replace"), f


def test_log_records_mask_a_registered_secret(caplog):
    from lmforge.utils.log import mask_secret

    mask_secret("sk-masked-in-every-record")
    caplog.set_level(logging.INFO)
    logging.getLogger("some.library").info("header Authorization: Bearer %s", "sk-masked-in-every-record")
    logging.getLogger("lmforge.x").warning("key=sk-masked-in-every-record twice sk-masked-in-every-record")
    assert [r.getMessage() for r in caplog.records[-2:]] == ["header Authorization: Bearer ***",
                                                             "key=*** twice ***"]


def test_args_json_never_holds_a_key(tmp_path):
    from lmforge.arguments import RlhfArguments, save_args

    args = RlhfArguments(model="builtin:tiny", dataset=["builtin:arith"], rlhf_type="grpo",
                         rollout_api_key="sk-rollout-secret-1234", reward_funcs=["accuracy"])
    text = save_args(args, tmp_path).read_text()
    assert "sk-rollout-secret-1234" not in text and json.loads(text)["rollout_api_key"] is None
    assert json.loads(text)["model"] == "builtin:tiny"
