"""Atomic file and folder writes: a crash mid-write never leaves a file that looks complete.

Files and folders written here get the modes a plain ``open()``/``mkdir`` would give under the
user's umask (0644/0755 under umask 022). That needs doing by hand: ``tempfile.mkstemp`` and
``mkdtemp`` create 0600/0700 on purpose, and safetensors 0.8 writes its weight files 0600 too, so a
checkpoint staged in a temporary place and renamed into view would otherwise be unreadable to a
serving account or a colleague.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the platform says it (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # elsewhere: set and restore (the only portable way to read it)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _mode_for(st_mode: int, is_dir: bool, umask: int) -> int:
    full = 0o777 if is_dir or st_mode & 0o111 else 0o666
    return full & ~umask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes the umask allows.

    Meant for files this process just wrote (a staged checkpoint, a temporary file): it widens a
    0600 from ``mkstemp``/safetensors to what ``open()`` would have given, and never grants an
    execute bit a file did not have.
    """
    umask = current_umask()
    path = Path(path)
    targets = [path]
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            targets += [Path(root) / n for n in dirs + files]
    for p in targets:
        if p.is_symlink():
            continue
        try:
            st = p.stat()
            mode = _mode_for(st.st_mode, p.is_dir(), umask)
            if st.st_mode & 0o777 != mode:
                os.chmod(p, mode)
        except OSError:  # a file that vanished, or one we do not own: leave it
            pass


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 -> what open() would give
        with os.fdopen(fd, "w", encoding=encoding) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (renames) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move a fully written folder ``src`` to ``dst`` in one rename (replacing an old ``dst``).

    Every file in it gets the umask's modes first (see :func:`apply_umask`): this is where staged
    checkpoints, merged exports and the built-in model become visible.
    """
    src, dst = Path(src), Path(dst)
    apply_umask(src)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)
