"""``python -m lmforge.ui.runner JOB_DIR -- COMMAND...``: runs one web-ui job and records how it ended.

The page starts this in a session of its own (its own process group), so Stop can send SIGINT to
the whole group, as Ctrl-C in a terminal would. The command writes its console output to
``JOB_DIR/console.log``; when it exits, this process writes ``JOB_DIR/exit.json`` with its exit code.
A page that was reloaded or restarted reads the job's state from these files alone, which is why a
small parent process is kept rather than a thread of the page's server: it outlives the page.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m lmforge.ui.runner JOB_DIR -- COMMAND...", file=sys.stderr)
        return 2
    job_dir, command = Path(argv[0]), argv[2:]
    # SIGINT reaches the whole group: the command stops as after Ctrl-C while this process waits for it.
    # A handler (not SIG_IGN, which the command would inherit) keeps this process alive.
    signal.signal(signal.SIGINT, lambda *_: None)
    from lmforge.utils.io import atomic_write_text

    with open(job_dir / "console.log", "ab", buffering=0) as log:
        try:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as e:
            log.write(f"cannot start {command[0]}: {e}\n".encode())
            code = 127
        else:
            while True:
                try:
                    code = proc.wait()
                    break
                except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                    continue
    for secret_file in job_dir.glob("secrets*.json"):  # the command has read it long ago
        secret_file.unlink(missing_ok=True)
    atomic_write_text(job_dir / "exit.json", json.dumps({"exit_code": code, "ended": time.time()}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
