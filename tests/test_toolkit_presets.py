"""Presets: every shipped one parses for each command it names; presets < --config < flags; user folders
($LMFORGE_PRESETS); bad presets fail naming their file; ``lmforge presets`` lists them."""
from __future__ import annotations

import json

import pytest

from lmforge.arguments import PtArguments, RlhfArguments, TrainArguments, parse_args
from lmforge.cli.main import main
from lmforge.presets import SHIPPED_DIR, list_presets

CLASSES = {"sft": TrainArguments, "pt": PtArguments, "rlhf": RlhfArguments}
SHIPPED = sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_preset_parses(name):
    [preset] = [p for p in list_presets() if p["name"] == name]
    assert preset["description"] and "\n" not in preset["description"]
    assert preset["commands"] and set(preset["commands"]) <= set(CLASSES)
    for command in preset["commands"]:
        args = parse_args(CLASSES[command], ["--preset", name, "--model", "builtin:tiny"])
        for key, value in preset["args"].items():
            got = getattr(args, key)
            assert got == value or (isinstance(value, float) and got == pytest.approx(value)), (name, key)


def test_order_presets_config_flags(tmp_path):
    a = parse_args(TrainArguments, ["--preset", "full", "fsdp"])
    assert (a.train_type, a.fsdp, a.gradient_checkpointing, a.learning_rate) == ("full", "full_shard", True, 1e-5)
    a = parse_args(TrainArguments, ["--preset", "full", "lora"])  # the later preset wins
    assert a.train_type == "lora" and a.learning_rate == 1e-4 and a.gradient_checkpointing is True
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: qlora\nlora_rank: 32\nlearning_rate: 3.0e-4\n")
    a = parse_args(TrainArguments, ["--config", str(cfg), "--learning_rate", "1e-3"])
    assert (a.train_type, a.lora_rank, a.learning_rate) == ("qlora", 32, 1e-3)  # preset < config < flag
    a = parse_args(TrainArguments, ["--config", str(cfg), "--preset", "dora"])  # --preset replaces the config's
    assert (a.train_type, a.lora_rank) == ("dora", 32)


def test_user_folder_wins_and_is_listed(tmp_path, monkeypatch, capsys):
    (tmp_path / "lora.yaml").write_text("description: our LoRA\ncommands: [sft]\nargs:\n  lora_rank: 64\n")
    (tmp_path / "mine.yml").write_text("description: team default\nargs:\n  train_type: full\n  seed: 7\n")
    monkeypatch.setenv("LMFORGE_PRESETS", str(tmp_path))
    assert parse_args(TrainArguments, ["--preset", "lora"]).lora_rank == 64
    a = parse_args(RlhfArguments, ["--preset", "mine"])  # no 'commands': every training command
    assert (a.train_type, a.seed) == ("full", 7)
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "our LoRA" in out and str(tmp_path / "lora.yaml") in out and "team default" in out
    assert main(["presets", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert set(SHIPPED) <= set(listed) and listed["lora"]["args"] == {"lora_rank": 64}


@pytest.mark.parametrize("text,needle", [
    ("description: x\nargs:\n  lora_rnak: 4\n", "unknown argument 'lora_rnak'. Did you mean --lora_rank"),
    ("description: x\nargs:\n  train_type: lorra\n", "--train_type must be one of"),
    ("description: x\nflags:\n  lora_rank: 4\n", "expected a mapping with 'description'"),
    ("description: x\ncommands: [rlhf]\nargs:\n  beta: 0.2\n", "is for lmforge rlhf, not lmforge sft"),
])
def test_bad_preset_names_its_file(tmp_path, capsys, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["sft", "--preset", str(f), "--model", "builtin:tiny"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and ("bad.yaml" in err or "is for" in needle)


def test_presets_only_on_training_commands_and_bare_bools():
    from lmforge.arguments import InferArguments

    with pytest.raises(SystemExit):
        parse_args(InferArguments, ["--preset", "lora"])
    a = parse_args(TrainArguments, ["--packing", "--model", "m", "--plot", "false"])
    assert a.packing is True and a.plot is False and a.model == "m"
