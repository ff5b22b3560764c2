"""Jobs the web UI starts: ``lmforge <command> ...`` in a process group of its own, with its state on disk.

Each job gets a folder under ``--jobs_dir`` holding ``job.json`` (the command, the run folder it
writes, the process id), ``console.log`` (everything the command prints) and, once it has ended,
``exit.json`` (written by :mod:`lmforge.ui.runner`). The page keeps nothing else, so a reload, a
second browser tab or a restarted ``lmforge web-ui`` finds running jobs again from these folders.

Stop sends SIGINT to the job's process group, as Ctrl-C does in a terminal: training finishes the
step, saves a checkpoint and prints the command that resumes it; a second Stop ends it at once.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.utils.io import atomic_write_text
from lmforge.utils.log import masked

JOB_FILE, EXIT_FILE, LOG_FILE, STOP_FILE = "job.json", "exit.json", "console.log", "stop.json"
_CHILDREN: dict[int, subprocess.Popen] = {}  # runners this process started, polled so none lingers as a zombie
_PROGRESS = re.compile(r"\bstep (\d+)/(\d+)\b|(\d+)/(\d+) \[")  # our progress lines; tqdm bars
_RESULT = re.compile(r"^[a-z][a-z-]*: .+ -> .+$")  # the one output rule's last line: "<command>: <what> -> <path>"


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell a job's process from a later one with its id."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]  # a zombie has ended


@dataclass
class Job:
    """One job's folder, read afresh on every look."""

    dir: Path
    info: dict[str, Any]

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def command(self) -> str:
        return self.info["command"]

    @property
    def run_dir(self) -> str | None:
        return self.info.get("run_dir")

    @property
    def exit_code(self) -> int | None:
        try:
            return json.loads((self.dir / EXIT_FILE).read_text())["exit_code"]
        except (OSError, ValueError, KeyError):
            return None

    def alive(self) -> bool:
        pid = self.info["pid"]
        child = _CHILDREN.get(pid)
        if child is not None:
            return child.poll() is None
        if sys.platform.startswith("linux"):
            return _proc_start(pid) == self.info.get("proc_start")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    @property
    def state(self) -> str:
        """running, stopping, finished, stopped (by Stop; resumable), failed, or lost (no exit recorded)."""
        code = self.exit_code
        if code is None:
            if self.alive():
                return "stopping" if (self.dir / STOP_FILE).exists() else "running"
            code = self.exit_code  # it may have ended between the two looks
            if code is None:
                return "lost"
        return "finished" if code == 0 else "stopped" if code == 130 else "failed"

    @property
    def label(self) -> str:
        return f"{self.id} ({self.state})"


def start_job(jobs_dir: str | Path, command: str, argv: list[str], *, display: str, run_dir: str | None = None,
              secret_values: dict[str, Any] | None = None) -> Job:
    """Start ``lmforge <command> <argv>`` (secrets through a private config file) and return its job."""
    folder = Path(jobs_dir) / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    folder.mkdir(parents=True)
    extra: list[str] = []
    if secret_values:
        path = folder / "secrets.json"  # 0600 from the start; the runner deletes it when the job ends
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(secret_values, fh)
        extra = ["--config", str(path)]
    cmd = [sys.executable, "-m", "lmforge.cli.main", command, *argv, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(folder / "runner.log", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge.ui.runner", str(folder), "--", *cmd],
                                start_new_session=True, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env)
    _CHILDREN[proc.pid] = proc
    info = {"command": command, "argv": argv, "display": display, "run_dir": run_dir, "pid": proc.pid,
            "proc_start": _proc_start(proc.pid), "started": time.time(), "cwd": os.getcwd()}
    atomic_write_text(folder / JOB_FILE, json.dumps(info, indent=2))
    return Job(folder, info)


def load_job(jobs_dir: str | Path, job_id: str | None) -> Job | None:
    name = (job_id or "").split(" ", 1)[0]  # a dropdown label "id (state)" names it too
    if not name or "/" in name or "\\" in name or name.startswith("."):  # a name from the browser: no other folder
        return None
    folder = Path(jobs_dir) / name
    try:
        return Job(folder, json.loads((folder / JOB_FILE).read_text()))
    except (OSError, ValueError):
        return None


def list_jobs(jobs_dir: str | Path, commands: tuple[str, ...] | None = None) -> list[Job]:
    """The jobs under ``jobs_dir`` (of ``commands`` only, if given), newest first."""
    root = Path(jobs_dir)
    if not root.is_dir():
        return []
    out = []
    for folder in root.iterdir():
        job = load_job(root, folder.name) if (folder / JOB_FILE).is_file() else None
        if job is not None and (commands is None or job.command in commands):
            out.append(job)
    return sorted(out, key=lambda j: j.info.get("started", 0), reverse=True)


def stop_job(job: Job) -> str:
    """SIGINT to the job's process group; says what happens next."""
    if job.exit_code is not None or not job.alive():
        return f"{job.id} is not running ({job.state})."
    try:
        stops = json.loads((job.dir / STOP_FILE).read_text())["count"]
    except (OSError, ValueError, KeyError):
        stops = 0
    try:
        os.killpg(job.info["pid"], signal.SIGINT)
    except ProcessLookupError:
        return f"{job.id} has just ended."
    atomic_write_text(job.dir / STOP_FILE, json.dumps({"count": stops + 1, "at": time.time()}))
    if stops:
        return f"Stop sent again to {job.id}: it stops at once (steps since the last checkpoint are lost)."
    return (f"Stop sent to {job.id}: training finishes this step, saves a checkpoint and prints how to resume "
            "(press Stop again to end it at once).")


def log_tail(job: Job, lines: int = 200, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of the console log; a bar redrawn with carriage returns shows its last state."""
    path = job.dir / LOG_FILE
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    rows = data.split("\n")
    if size > max_bytes:
        rows = rows[1:]  # the first one was cut
    rows = [row.rstrip("\r").rsplit("\r", 1)[-1] for row in rows]
    return masked("\n".join(rows[-lines:]))


def progress(text: str) -> tuple[int, int] | None:
    """(done, total) from the last progress line in ``text``."""
    last = None
    for m in _PROGRESS.finditer(text):
        last = m
    if last is None:
        return None
    done, total = (last.group(1), last.group(2)) if last.group(1) else (last.group(3), last.group(4))
    return int(done), int(total)


def result_lines(text: str) -> list[str]:
    """The ``<command>: <what> -> <path>`` lines a command ends with."""
    return [row for row in text.splitlines() if _RESULT.match(row)]
