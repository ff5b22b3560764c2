"""Damaged checkpoints are recognised and passed over (naming the file and the checkpoint), a resume from
the newest intact one ends at the same weights as an uninterrupted run, and a save that fills the disk
says "No space left on device", where, and what it needed, keeping the previous checkpoint."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.utils.checkpoint import (COMPLETE_MARKER, DiskFullError, describe_files, disk_full_error,
                                      find_last_checkpoint, verify_checkpoint)


def _checkpoint(folder: Path, step: int, record: bool = True) -> Path:
    """A checkpoint with the files a Trainer writes (real safetensors, a torch zip, JSON) and its marker."""
    from safetensors.torch import save_file

    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.randn(64, 64), "b": torch.zeros(64)}, str(ckpt / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.randn(64, 64)}}}, ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    marker = {"global_step": step, **({"files": describe_files(ckpt)} if record else {})}
    (ckpt / COMPLETE_MARKER).write_text(json.dumps(marker))
    return ckpt


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


CORRUPTIONS = {
    "truncated-weights": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors: "),
    "truncated-optimizer": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt: "),
    "broken-trainer-state": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 4, '),
                             "trainer_state.json: "),
    "flipped-byte": (lambda c: _flip(c / "model.safetensors"), "model.safetensors: its SHA-256 differs"),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the recorded hash can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("record", [True, False], ids=["marker-with-files", "old-marker"])
@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_each_corruption_is_named(tmp_path, kind, record):
    ckpt = _checkpoint(tmp_path, 4, record)
    assert verify_checkpoint(ckpt) == []
    corrupt, words = CORRUPTIONS[kind]
    corrupt(ckpt)
    problems = verify_checkpoint(ckpt)
    if kind == "flipped-byte" and not record:
        assert problems == []  # without recorded hashes a same-size change is invisible (why they are recorded)
        return
    assert len(problems) == 1 and problems[0].startswith(words), problems


def test_last_checkpoint_passes_over_damaged_ones_and_says_why(tmp_path, caplog):
    good = _checkpoint(tmp_path, 2)
    bad = _checkpoint(tmp_path, 4)
    _truncate(bad / "optimizer.pt")
    (tmp_path / ".staging" / "checkpoint-6").mkdir(parents=True)  # a save in progress is not a run folder
    with caplog.at_level(logging.WARNING, logger="lmforge.utils.checkpoint"):
        assert find_last_checkpoint(tmp_path) == good
    assert f"Checkpoint {bad} is damaged (optimizer.pt: " in caplog.text and f"using the older {good}" in caplog.text
    assert ".staging" not in caplog.text
    _truncate(good / "model.safetensors")
    assert find_last_checkpoint(tmp_path) is None


def test_disk_full_is_recognised_from_errno_or_from_a_failed_write_on_a_full_disk(tmp_path):
    full = disk_full_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "out", 5 << 20)
    assert isinstance(full, DiskFullError) and full.errno == errno.ENOSPC
    assert f"writing into {tmp_path / 'out'} failed" in str(full) and "needs about 5.0 MB" in str(full)
    torch_says = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1962944 vs 1962832")
    free = shutil.disk_usage(tmp_path).free
    assert disk_full_error(torch_says, tmp_path, free + (1 << 30)) is not None  # less free than needed
    assert disk_full_error(torch_says, tmp_path, 1) is None  # plenty of room: some other failure
    assert disk_full_error(OSError(errno.EACCES, "Permission denied"), tmp_path, 1 << 60) is None


def _train(out: Path, **kw):
    from lmforge import TrainArguments, sft_main

    args = dict(model="builtin:tiny", dataset=["builtin:arith#64"], output_dir=str(out), add_version=False,
                train_type="full", max_steps=4, save_steps=2, per_device_train_batch_size=4,
                gradient_accumulation_steps=1, learning_rate=1e-3, report_to=["none"], plot=False, logging_steps=1)
    return sft_main(TrainArguments(**{**args, **kw}))


def test_resume_passes_over_a_corrupted_newest_checkpoint_to_the_same_weights(tmp_path, caplog):
    """About 10 s on two cores: a 4-step full fine-tune of builtin:tiny, then a resume from step 2."""
    from safetensors.torch import load, load_file

    out = tmp_path / "run"
    _train(out)
    final = load((out / "checkpoint-4" / "model.safetensors").read_bytes())  # the uninterrupted run's weights
    # (read into memory: load_file maps the file, and the truncation below would change those tensors)
    assert json.loads((out / "checkpoint-4" / COMPLETE_MARKER).read_text())["files"]["optimizer.pt"]["sha256"]
    for corrupt, _ in list(CORRUPTIONS.values())[:3]:  # truncated weights and optimizer, broken trainer state
        corrupt(out / "checkpoint-4")
    with caplog.at_level(logging.WARNING):
        result = _train(out, resume_from_checkpoint="last")
    warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert str(out / "checkpoint-4") in warning and str(out / "checkpoint-2") in warning
    assert all(f in warning for f in ("model.safetensors: ", "optimizer.pt: ", "trainer_state.json: "))
    resumed = load_file(str(Path(result["last_checkpoint"]) / "model.safetensors"))
    assert result["last_checkpoint"] == str(out / "checkpoint-4") and verify_checkpoint(out / "checkpoint-4") == []
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs user namespaces to mount a small tmpfs")
def test_disk_full_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    """About 10 s on two cores: a real full disk (a 16 MB tmpfs in a private mount namespace) that holds one
    10.5 MB checkpoint of a builtin:tiny full fine-tune but not a second."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    train = [sys.executable, "-m", "lmforge.cli.main", "sft", "--model", "builtin:tiny", "--dataset",
             "builtin:arith#64", "--output_dir", str(out), "--add_version", "false", "--train_type", "full",
             "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "1", "--report_to", "none", "--plot", "false"]
    check = [sys.executable, "-c", "import sys; from lmforge.utils.checkpoint import verify_checkpoint; "
             f"print('VERIFY', verify_checkpoint({str(out / 'checkpoint-2')!r}), sorted(__import__('os').listdir("
             f"{str(out)!r})))"]
    script = (f"mount -t tmpfs -o size=16m tmpfs {disk} && {subprocess.list2cmdline(train)}; echo RC=$?; "
              f"{subprocess.list2cmdline(check)}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    text = done.stdout + done.stderr
    assert "RC=2" in text, text[-3000:]
    error = next(ln for ln in text.splitlines() if "lmforge sft: error:" in ln)
    assert "No space left on device" in error and f"writing into {out} failed" in error
    assert "needs about 10." in error and f"the previous checkpoint {out / 'checkpoint-2'} is kept" in error
    assert "Traceback" not in text
    assert "VERIFY [] ['.staging', 'args.json', 'checkpoint-2']" in text  # intact, and no half checkpoint-4
