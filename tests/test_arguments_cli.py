"""Arguments and CLI: flags, config files, errors that name the flag, fast --help."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from lmforge.arguments import ArgumentError, TrainArguments, from_dict, parse_args, read_args_json, save_args


def test_flags_lists_dicts_bools():
    a = parse_args(TrainArguments, ["--model", "builtin:tiny", "--dataset", "a.jsonl", "b.jsonl#5",
                                    "--columns", '{"q": "query"}', "--strict", "false", "--lora_rank", "4",
                                    "--learning_rate", "3e-4"])
    assert a.dataset == ["a.jsonl", "b.jsonl#5"]
    assert a.columns == {"q": "query"} and a.strict is False and a.lora_rank == 4 and a.learning_rate == 3e-4


def test_config_file_and_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: builtin:tiny\nlora_rank: 16\ndataset: [x.jsonl]\nnum_train_epochs: 2\n")
    a = parse_args(TrainArguments, ["--config", str(cfg), "--lora_rank", "32"])
    assert (a.model, a.lora_rank, a.dataset, a.num_train_epochs) == ("builtin:tiny", 32, ["x.jsonl"], 2.0)
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"model": "m", "train_type": "full"}))
    assert parse_args(TrainArguments, ["--config", str(js)]).train_type == "full"


def test_unknown_in_config_suggests(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_rnak: 4\n")
    with pytest.raises(ArgumentError, match="lora_rank"):
        from_dict(TrainArguments, {"lora_rnak": 4})


@pytest.mark.parametrize("argv,needle", [
    (["--lora_rnak", "4"], "Did you mean --lora_rank"),
    (["--train_type", "lorra"], "Did you mean 'lora'"),
    (["--lora_rank", "four"], "--lora_rank"),
    (["--columns", "{bad"], "--columns"),
    (["--strict", "maybe"], "--strict"),
])
def test_bad_flags_fail_before_work(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(TrainArguments, ["--model", "builtin:tiny", *argv], prog="lmforge sft")
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_args_json_roundtrip(tmp_path):
    a = TrainArguments(model="builtin:tiny", system="Be brief.", template="chatml")
    save_args(a, tmp_path)
    back = read_args_json(tmp_path / "checkpoint-5")  # looked up in the parent folder too
    assert back["model"] == "builtin:tiny" and back["system"] == "Be brief." and back["template"] == "chatml"
    assert from_dict(TrainArguments, back).system == "Be brief."


def test_cli_help_lists_commands_and_flags():
    out = subprocess.run([sys.executable, "-m", "lmforge.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "sft" in out.stdout and "pt" in out.stdout
    out = subprocess.run([sys.executable, "-m", "lmforge.cli.main", "sft", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--model", "--dataset", "--lora_rank", "--packing", "--resume_from_checkpoint"):
        assert flag in out.stdout
    assert "(default: 8)" in out.stdout  # lora_rank's default is shown


def test_cli_unknown_command_suggests():
    out = subprocess.run([sys.executable, "-m", "lmforge.cli.main", "sfft"], capture_output=True, text=True)
    assert out.returncode == 2 and "Did you mean 'sft'" in out.stderr


def test_cli_help_cold_start_is_fast():
    # The CLI imports nothing heavy before a command runs (best of three to ignore a cold disk cache).
    best = min(_time_help() for _ in range(3))
    assert best < 1.5, f"lmforge --help took {best:.2f}s"


def _time_help() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmforge.cli.main", "--help"], capture_output=True, check=True)
    return time.perf_counter() - t


def test_import_lmforge_is_cheap():
    code = "import sys, lmforge, lmforge.cli.main, lmforge.arguments; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
