"""What a new user trips on in the first hour (issue #20): file modes, clear one-line failures before any
model loads, no leftover run folders, Ctrl-C during training, piped chat, help text, progress lines, plots."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from lmforge.arguments import InferArguments, TrainArguments
from lmforge.cli.main import main


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in root.rglob("*")}


# ---------------------------------------------------------------------------------------------- file modes


def test_atomic_writes_follow_the_umask(tmp_path):
    from safetensors.torch import save_file

    import torch

    from lmforge.utils.io import atomic_write_text, replace_dir

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        staged = tmp_path / "staged"
        staged.mkdir(mode=0o700)
        save_file({"w": torch.zeros(2)}, str(staged / "w.safetensors"))
        assert staged.joinpath("w.safetensors").stat().st_mode & 0o777 == 0o600  # what safetensors does itself
        replace_dir(staged, tmp_path / "final")
        os.umask(0o077)  # a private umask is kept private
        atomic_write_text(tmp_path / "private.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert _modes(tmp_path / "final") == {"w.safetensors": "0o644"}
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600


def test_training_outputs_are_readable_by_others(tmp_path, umask_022):
    """Every file of a LoRA run (weights, args.json, the checkpoint marker, logs) is 0644 under umask 022."""
    from lmforge import sft_main

    out = tmp_path / "run"
    sft_main(TrainArguments(model="builtin:tiny", dataset=["builtin:arith#16"], output_dir=str(out), add_version=False,
                            max_steps=2, save_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                            report_to=["none"], plot=False, logging_steps=1))
    modes = _modes(out)
    for name in ("args.json", "checkpoint-2/adapter_model.safetensors", "checkpoint-2/args.json",
                 "checkpoint-2/lmforge_checkpoint.json", "checkpoint-2/tokenizer.json", "logging.jsonl"):
        assert modes[name] == "0o644", (name, modes[name])
    assert {m for n, m in modes.items() if (out / n).is_file()} == {"0o644"}, modes
    assert {m for n, m in modes.items() if (out / n).is_dir()} == {"0o755"}, modes


# ------------------------------------------------------------------ checks before the model loads, exit 2


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fails the test if a command gets as far as loading a model or building an engine."""
    import lmforge.model
    import lmforge.pipelines.infer

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the cheap checks failed")

    monkeypatch.setattr(lmforge.model, "get_model_tokenizer", refuse)
    monkeypatch.setattr(lmforge.pipelines.infer, "build_engine", refuse)


def _one_line_error(capsys, cmd: str, *, only: bool = True) -> str:
    """The error line (``only``: the whole of stderr; else the last line, after the load's progress bars)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and (len(err.splitlines()) == 1 or not only), err
    err = err.splitlines()[-1]
    assert err.startswith(f"lmforge {cmd}: error: ") and err.count(f"lmforge {cmd}") == 1, err
    return err


def test_empty_or_incomplete_model_folder_is_one_line(tmp_path, capsys, monkeypatch):
    from lmforge.model.builtin import builtin_model_dir

    monkeypatch.chdir(tmp_path)
    empty, only_config, adapter = tmp_path / "empty", tmp_path / "only_config", tmp_path / "adapter"
    for d in (empty, only_config, adapter):
        d.mkdir()
    (only_config / "config.json").write_text((builtin_model_dir("builtin:tiny") / "config.json").read_text())
    (adapter / "adapter_config.json").write_text("{}")
    capsys.readouterr()  # building the builtin model above may print progress; only the commands' output counts

    assert main(["sft", "--model", "empty", "--dataset", "builtin:arith#8"]) == 2
    assert "the folder is empty" in _one_line_error(capsys, "sft")
    assert main(["infer", "--model", str(only_config)]) == 2
    err = _one_line_error(capsys, "infer")
    assert "no weights" in err and "no tokenizer files" in err and "config.json" not in err.split(":", 3)[-1]
    assert "sentencepiece" not in err
    assert main(["sft", "--model", str(adapter), "--dataset", "builtin:arith#8"]) == 2
    assert "a LoRA adapter, not a model; pass it as --ckpt_dir" in _one_line_error(capsys, "sft")
    assert not (tmp_path / "output").exists()  # no run folder was left behind


def test_a_missing_dataset_fails_before_the_model_loads_and_leaves_no_folder(tmp_path, capsys, monkeypatch,
                                                                           no_model_load):
    monkeypatch.chdir(tmp_path)
    assert main(["sft", "--model", "builtin:tiny", "--dataset", "missing.jsonl"]) == 2
    assert "no such file or directory 'missing.jsonl'" in _one_line_error(capsys, "sft")
    assert main(["rlhf", "--rlhf_type", "dpo", "--model", "builtin:tiny", "--dataset", "builtin:nope"]) == 2
    assert "builtin:nope" in _one_line_error(capsys, "rlhf")
    assert main(["infer", "--model", "builtin:tiny", "--val_dataset", "questions.jsonl"]) == 2
    assert "questions.jsonl" in _one_line_error(capsys, "infer")
    assert not (tmp_path / "output").exists()


def test_a_start_that_fails_after_the_model_loaded_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "robot", "content": "beep"}]}\n')
    assert main(["sft", "--model", "builtin:tiny", "--dataset", "bad.jsonl"]) == 2
    assert "bad.jsonl:1: field 'messages[0].role'" in _one_line_error(capsys, "sft", only=False)
    assert not (tmp_path / "output").exists()


def test_busy_port_fails_before_the_model_loads(capsys, no_model_load):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["deploy", "--model", "builtin:tiny", "--port", str(port)]) == 2
        err = _one_line_error(capsys, "deploy")
    assert f"--port {port}: 127.0.0.1:{port} is already in use" in err


def test_export_error_names_the_command_once(tmp_path, capsys):
    assert main(["export", "--ckpt_dir", str(tmp_path)]) == 2
    assert "nothing to do: pass --merge_lora true, --quant_method or --push_to_hub true" in _one_line_error(capsys, "export")


# ------------------------------------------------------------------------------------------------ Ctrl-C


SLOW_STEPS = '''
import time
from transformers import TrainerCallback
from lmforge.registry import CALLBACKS


@CALLBACKS.register("slow_steps")
class SlowSteps(TrainerCallback):
    """Keeps the run long enough for a Ctrl-C to land mid-training."""

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.3)
'''


def _lmforge(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli.main", *argv]


@pytest.mark.slow
def test_ctrl_c_saves_stops_says_how_to_resume_and_the_resume_finishes(tmp_path):
    """SIGINT to a real ``lmforge sft`` mid-run, then the printed resume command. About 30 s on 2 idle cores."""
    (tmp_path / "slow.py").write_text(SLOW_STEPS)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    argv = ["sft", "--model", "builtin:tiny", "--dataset", "builtin:arith#256", "--train_type", "full",
            "--max_steps", "20", "--save_steps", "100", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--report_to", "none", "--plot", "false",
            "--output_dir", "run", "--add_version", "false", "--external_plugins", "slow.py",
            "--callbacks", "slow_steps"]
    proc = subprocess.Popen(_lmforge(argv), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen = []
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if line.startswith("step 3/20") or not line:
            break
    assert any(s.startswith("step 3/20") for s in seen), "".join(seen)[-3000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    m = re.search(r"Training stopped by Ctrl-C after step (\d+) of 20\.", err)
    assert m, err[-3000:]
    step = int(m.group(1))
    assert 3 <= step < 20
    assert f"Newest complete checkpoint: run/checkpoint-{step}" in err
    assert (tmp_path / "run" / f"checkpoint-{step}" / "lmforge_checkpoint.json").is_file()
    resume = err.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    words = shlex.split(resume)
    assert words[:2] == ["lmforge", "sft"] and words[-2:] == ["--resume_from_checkpoint", f"run/checkpoint-{step}"]

    done = subprocess.run(_lmforge(words[1:]), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resuming from run/checkpoint-{step} (step {step} of 20)" in done.stderr
    assert f"step {step + 1}/20" in done.stderr and "step 1/20" not in done.stderr
    assert (tmp_path / "run" / "checkpoint-20" / "lmforge_checkpoint.json").is_file()
    assert done.stdout.strip().splitlines()[-1] == "sft: checkpoints, logs and plots -> run (last: run/checkpoint-20)"


def test_second_ctrl_c_stops_at_once_and_names_the_newest_checkpoint(tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState

    import lmforge.utils.command
    from lmforge.trainers.callbacks import InterruptCallback
    from lmforge.utils.command import set_invocation

    monkeypatch.setattr(lmforge.utils.command, "_invocation", None)  # restored after the test
    (tmp_path / "checkpoint-4").mkdir()
    for name in ("lmforge_checkpoint.json", "trainer_state.json"):
        (tmp_path / "checkpoint-4" / name).write_text("{}")
    state, control = TrainerState(global_step=6, max_steps=30), TrainerControl()
    stream = io.StringIO()
    cb = InterruptCallback(stream=stream)
    previous = signal.getsignal(signal.SIGINT)
    cb.on_train_begin(None, state, control)
    try:
        assert signal.getsignal(signal.SIGINT) == cb._handle
        os.kill(os.getpid(), signal.SIGINT)  # the first: noted, training goes on to the end of the step
        assert cb.requested and "stopping after this step" in stream.getvalue()
        cb.on_step_end(None, state, control)
        assert control.should_save and control.should_training_stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: now
    finally:
        cb.on_train_end(None, state, control)
    assert signal.getsignal(signal.SIGINT) == previous
    set_invocation("sft", ["--model", "m", "--resume_from_checkpoint", "old", "--hub_token", "hf_secret"])
    msg = cb.stop_message(state, str(tmp_path), hard=True)
    assert "after step 6 of 30" in msg and f"Newest complete checkpoint: {tmp_path / 'checkpoint-4'}" in msg
    assert msg.splitlines()[-1].strip() == (f"lmforge sft --model m --hub_token '<hidden>' "
                                            f"--resume_from_checkpoint {tmp_path / 'checkpoint-4'}")


# -------------------------------------------------------------------------------------------- piped chat


@pytest.fixture(scope="module")
def tiny_engine():
    from lmforge.infer.hf import HfEngine

    return HfEngine("builtin:tiny", device="cpu")


def _answers(engine, lines: list[str], keep_history: bool) -> tuple[list[str], list[int]]:
    """The replies to ``lines`` and the number of messages each request carried."""
    from lmforge.infer import RequestConfig
    from lmforge.pipelines.infer import chat

    sizes: list[int] = []
    replies: list[str] = []
    real = engine.infer_stream

    def recording(request, config=None):
        sizes.append(len(request.messages))
        replies.append("")
        for chunk in real(request, config):
            replies[-1] += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            yield chunk

    engine.infer_stream = recording
    feed = iter(lines)

    def read_line(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    try:
        chat(engine, RequestConfig(max_tokens=8), read_line=read_line, out=io.StringIO(), keep_history=keep_history)
    finally:
        del engine.infer_stream
    return replies, sizes


def test_piped_lines_are_answered_each_on_their_own(tiny_engine):
    questions = ["What is 12 + 30?", "Who made you?", "Say hello."]
    alone = [_answers(tiny_engine, [q], keep_history=False)[0][0] for q in questions]
    piped, sizes = _answers(tiny_engine, questions, keep_history=False)
    assert piped == alone and sizes == [1, 1, 1]
    kept, sizes = _answers(tiny_engine, questions, keep_history=True)
    assert sizes == [1, 3, 5] and kept[0] == alone[0]


def test_infer_defaults_to_independent_lines_when_stdin_is_a_pipe(monkeypatch, capsys):
    from lmforge.pipelines.infer import infer_main

    monkeypatch.setattr(sys, "stdin", io.StringIO("Who made you?\nSay hello.\n"))
    history = infer_main(InferArguments(model="builtin:tiny", max_new_tokens=4))["history"]
    assert [m["content"] for m in history if m["role"] == "user"] == ["Say hello."]  # the last line only
    assert "Each message is answered on its own" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- help


def test_help_shows_types_and_choices_and_each_default_once():
    from lmforge.arguments.base import build_parser

    text = build_parser(TrainArguments, "lmforge sft").format_help()
    assert "VALUE" not in text and "(choices:" not in text
    assert "--train_type {lora,dora,qlora,full,freeze}" in text and "--packing {true,false}" in text
    assert "--learning_rate FLOAT" in text and "--dataset STR [STR ...]" in text and "--model_kwargs JSON" in text
    flat = re.sub(r"\s+", " ", text)
    assert "--eval_steps INT evaluate every N steps (default: save_steps) " in flat
    entries = [re.sub(r"'default'|\(default: default\)", "", e) for e in re.split(r"\n  --", text)]
    assert all(e.count("default") <= 1 for e in entries), [e for e in entries if e.count("default") > 1]
    assert "'default' (assistant turns), last_round, all, ... (default: default)" in flat
    assert "when set, --optim is ignored" in flat and "used when --optimizer is not set" in flat


# ----------------------------------------------------------------------------------------- progress lines


def _progress_lines(logs_per_step: list[dict]) -> str:
    from transformers import TrainerControl, TrainerState

    from lmforge.trainers.callbacks import ProgressCallback

    stream = io.StringIO()
    cb = ProgressCallback(use_bar=False, stream=stream)
    state = TrainerState(max_steps=len(logs_per_step), is_world_process_zero=True)
    cb.on_train_begin(None, state, TrainerControl())
    for step, logs in enumerate(logs_per_step, 1):
        state.global_step = step
        cb.on_log(None, state, TrainerControl(), logs=logs)
    return stream.getvalue()


def test_dpo_progress_shows_reward_accuracy_and_margin():
    text = _progress_lines([{"loss": 0.69, "learning_rate": 1e-4, "rewards/accuracies": 0.75,
                             "rewards/margins": 0.1234, "rewards/chosen": 0.2}])
    assert text.startswith("step 1/1 loss=0.69 lr=0.0001 acc=0.75 margin=0.123 ")


def test_grpo_progress_counts_groups_without_reward_spread():
    text = _progress_lines([{"loss": 0.1, "learning_rate": 1e-4, "reward": 0.5, "frac_reward_zero_std": 0.25,
                             "rollout/groups": 8.0},
                            {"loss": 0.0, "learning_rate": 1e-4, "reward": 1.0, "frac_reward_zero_std": 1.0,
                             "rollout/groups": 8.0}])
    lines = text.splitlines()
    assert "reward=0.5 no-spread=2/8" in lines[1] and "reward=1 no-spread=8/8" in text
    assert "carry no learning signal" in lines[0] and text.count("carry no learning signal") == 1
    assert "no group had any reward spread in the steps logged at step 2" in text


def test_grpo_logs_how_many_groups_it_trained_on(tmp_path, capsys):
    from lmforge.model import get_model_tokenizer
    from lmforge.pipelines.rlhf import grpo_main
    from test_grpo import _grpo_args, _half_right
    from test_grpo_support import ScriptedEngine

    tok = get_model_tokenizer("builtin:tiny", load_model=False)[1]
    result = grpo_main(_grpo_args(tmp_path, max_steps=1), engine=ScriptedEngine(tok, _half_right))
    (logs,) = [h for h in result["log_history"] if "loss" in h]
    assert logs["rollout/groups"] == 4.0  # 4 prompts per step, G samples each
    flat = round(logs["frac_reward_zero_std"] * 4)
    assert 0 < flat < 4  # even sums: all samples right (no spread); odd ones: half right
    assert f"no-spread={flat}/4" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- eval plot


def _report(tmp_path: Path, rows: list[tuple[str, float]]) -> dict:
    pred = tmp_path / "predictions" / "qa.jsonl"
    pred.parent.mkdir(parents=True)
    pred.write_text("".join(json.dumps({"index": i, "reference": ref, "scores": {"accuracy": s}}) + "\n"
                            for i, (ref, s) in enumerate(rows)))
    acc = sum(s for _, s in rows) / len(rows)
    return {"target": "m", "datasets": {"qa": {"metrics": {"accuracy": acc}, "metric_names": ["numeric"],
                                               "rows": len(rows), "errors": 0, "predictions": "predictions/qa.jsonl"}}}


def test_one_metric_is_plotted_by_reference_length_or_not_at_all(tmp_path):
    from lmforge.eval.report import length_buckets, write_report

    varied = [("7", 1.0)] * 4 + [("42", 1.0), ("42", 0.0)] * 3 + [("123", 0.0)] * 4
    files = write_report(_report(tmp_path / "a", varied), tmp_path / "a")
    assert (tmp_path / "a" / "eval_report.png").stat().st_size > 1000 and "plot" in files
    assert length_buckets(tmp_path / "a" / "predictions" / "qa.jsonl", "accuracy") == \
        (["1", "2", "3"], [1.0, 0.5, 0.0], [4, 6, 4])
    flat = [("7", 0.0)] * 5 + [("123", 0.0)] * 5  # a base model: 0.000 everywhere
    files = write_report(_report(tmp_path / "b", flat), tmp_path / "b")
    assert "plot" not in files and not (tmp_path / "b" / "eval_report.png").exists()


# ------------------------------------------------------------------------- data, warnings, output rule


def test_a_request_beyond_the_split_says_rows_repeat(caplog):
    from lmforge.dataset import load_dataset

    with caplog.at_level("INFO", logger="lmforge.dataset.loader"):
        train, _ = load_dataset(["builtin:arith#20000"])
    assert len(train) == 20000
    assert ("builtin:arith#20000: builtin:arith:train has 14,300 rows, fewer than the 20,000 asked for, so 5,700 "
            "rows are repeats (every row used once and 5,700 of them twice)") in caplog.text


def test_lora_wrapping_raises_no_deprecation_warning(tiny_model_tokenizer):
    from transformers import PreTrainedModel

    from lmforge.tuners import prepare_model

    before = PreTrainedModel.__dict__["is_gradient_checkpointing"]
    model, _ = tiny_model_tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        prepare_model(model, TrainArguments(train_type="lora", gradient_checkpointing=True))
    assert PreTrainedModel.__dict__["is_gradient_checkpointing"] is before  # the alias is gone again


def test_one_output_rule(tmp_path, monkeypatch):
    from lmforge.utils.command import default_output, model_slug

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "output" / "arith-sft"
    (run / "checkpoint-800").mkdir(parents=True)
    assert re.fullmatch(r"infer-checkpoint-800-\d{8}-\d{6}\.jsonl",
                        default_output("infer", str(run / "checkpoint-800"), ".jsonl").name)
    assert default_output("eval", str(run / "checkpoint-800")).parent == run
    assert default_output("eval", str(run)).parent == run  # a run folder given as the checkpoint
    assert default_output("sample", "Qwen/Qwen2.5-0.5B-Instruct").parent == Path("output/Qwen-Qwen2.5-0.5B-Instruct")
    assert default_output("export", "builtin:tiny").parent == Path("output/builtin-tiny")
    assert model_slug(str(run / "checkpoint-800")) == "arith-sft-checkpoint-800"  # training from a checkpoint
