"""Finding intact checkpoints, and saying plainly when the disk is full (light: no torch or transformers
import, so infer can use it cheaply).

A checkpoint is complete when its marker (``lmforge_checkpoint.json``, written last) exists, and
intact when every file still has the size and SHA-256 the marker recorded. Damage that a marker
cannot see (a checkpoint from before files were recorded, a file over :data:`HASH_LIMIT` that is
recorded by size only) is looked for by reading each file's own structure: a safetensors header
and the data length it declares, a torch zip archive's directory, a JSON document. Resuming picks
the newest intact checkpoint and says what was wrong with any newer one, instead of failing deep
inside safetensors or torch with a message that names neither file nor checkpoint.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "lmforge_checkpoint.json"  # written last: its presence means the checkpoint is whole
HASH_LIMIT = 1 << 30  # larger files are recorded by size (hashing costs about a second per GB, at save and resume)
_ZIP_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save's zip archives


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_files(folder: str | os.PathLike) -> dict[str, dict]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file under ``folder`` but the marker
    (no hash for files over :data:`HASH_LIMIT`), for the marker to record."""
    folder = Path(folder)
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        size = path.stat().st_size
        out[path.relative_to(folder).as_posix()] = {"size": size, **({"sha256": _sha256(path)}
                                                                   if size <= HASH_LIMIT else {})}
    return out


def _structure_problem(path: Path) -> str | None:
    """What is wrong with a file judged by its own format (safetensors, torch zip, JSON), or None."""
    name, size = path.name, path.stat().st_size
    try:
        if name.endswith(".safetensors"):
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return f"{name}: {size} bytes, too short for a safetensors header"
                (n,) = struct.unpack("<Q", head)
                if 8 + n > size:
                    return f"{name}: {size:,} bytes, shorter than its own header says ({8 + n:,}); truncated"
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if size != 8 + n + end:
                return f"{name}: {size:,} bytes, but its header describes {8 + n + end:,}; truncated or padded"
        elif name.endswith(_ZIP_SUFFIXES):
            with open(path, "rb") as f:
                is_zip_start = f.read(4) == b"PK\x03\x04"
            if is_zip_start:
                with zipfile.ZipFile(path) as z:
                    z.namelist()
        elif name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
            struct.error) as e:
        return f"{name}: unreadable ({type(e).__name__}: {str(e)[:120]})"
    return None


def verify_checkpoint(path: str | os.PathLike, *, hashes: bool = True, need_marker: bool = True) -> list[str]:
    """What is wrong with checkpoint ``path`` (an empty list: intact): missing marker or files, sizes and
    hashes that differ from the marker's record, files whose own structure is broken.

    ``need_marker=False`` accepts a folder without lmforge's marker (a plain Trainer checkpoint) and
    checks its files' structure only.
    """
    path = Path(path)
    marker = path / COMPLETE_MARKER
    if not marker.is_file() and need_marker:
        return [f"no {COMPLETE_MARKER}: it was cut off mid-write"]
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8")).get("files") or {} if marker.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        return [f"{COMPLETE_MARKER}: unreadable ({e})"]
    problems = []
    for rel, want in recorded.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != want.get("size"):
            problems.append(f"{rel}: {f.stat().st_size:,} bytes, the marker recorded {want.get('size'):,}")
        elif hashes and want.get("sha256") and _sha256(f) != want["sha256"]:
            problems.append(f"{rel}: its SHA-256 differs from the one recorded (the bytes changed after saving)")
    damaged = {p.split(":", 1)[0] for p in problems}
    if not (path / "trainer_state.json").is_file() and "trainer_state.json" not in damaged:
        problems.append("trainer_state.json: missing")
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        rel = f.relative_to(path).as_posix()
        if rel not in damaged and (rel not in recorded or "sha256" not in recorded[rel]):
            problem = _structure_problem(f)
            if problem:
                problems.append(rel + problem[len(f.name):])
    return problems


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file() and (Path(path) / "trainer_state.json").is_file()


def _order(root: Path):
    def key(p: Path) -> tuple[int, str, int]:  # newest run folder (v<N>-<time>), then the highest step in it
        m = re.match(r"v(\d+)-", p.parent.name) if p.parent != root else None
        return (int(m.group(1)) if m else -1, p.parent.name, int(p.name.split("-")[-1]))
    return key


def find_last_checkpoint(root: str | os.PathLike, *, verify: bool = True) -> Path | None:
    """The newest intact ``checkpoint-N`` under ``root`` or its run folders (``root/v*/``).

    Newer checkpoints that are incomplete or damaged are passed over, each with a warning that says
    what is wrong with it (``verify=False`` checks only that the marker exists).
    """
    root = Path(root)
    nested = [p for p in root.glob("*/checkpoint-*") if not p.parent.name.startswith(".")]  # not .staging
    cands = [p for p in [*root.glob("checkpoint-*"), *nested] if p.is_dir() and p.name.split("-")[-1].isdigit()]
    complete = [p for p in cands if is_complete_checkpoint(p)]
    for p in set(cands) - set(complete):
        logger.warning("Ignoring incomplete checkpoint %s (no %s: it was cut off mid-write)", p, COMPLETE_MARKER)
    skipped: list[tuple[Path, list[str]]] = []
    for p in sorted(complete, key=_order(root), reverse=True):
        problems = verify_checkpoint(p) if verify else []
        if not problems:
            for bad, why in skipped:
                logger.warning("Checkpoint %s is damaged (%s); using the older %s instead", bad, "; ".join(why), p)
            return p
        skipped.append((p, problems))
    for bad, why in skipped:
        logger.warning("Checkpoint %s is damaged (%s)", bad, "; ".join(why))
    return None


# ---- disk full ---------------------------------------------------------------------------------

class DiskFullError(OSError):
    """A save ran out of disk space; the message says where, how much was free and how much was needed."""


_WRITE_FAILURES = ("inline_container", "iostream error", "PytorchStreamWriter", "file write failed",
                   "unexpected pos")


def folder_size(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def disk_full_error(exc: BaseException, folder: str | os.PathLike, needed: int) -> DiskFullError | None:
    """A :class:`DiskFullError` if ``exc`` (raised while writing into ``folder``) means the disk is full, else None.

    torch and safetensors often lose the errno (``enforce fail at inline_container.cc``,
    ``basic_ios::clear: iostream error``); such a write failure counts as a full disk when less than
    ``needed`` bytes are free there.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    full = any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) for x in chain)
    full = full or any("No space left on device" in str(x) for x in chain)
    full = full or (free < needed and any(w in str(x) for x in chain for w in _WRITE_FAILURES))
    if not full:
        return None
    return DiskFullError(errno.ENOSPC, f"No space left on device: writing into {folder} failed with "
                                       f"{_mb(free)} free on that disk; a checkpoint here needs about "
                                       f"{_mb(needed)} ({type(exc).__name__}: {str(exc)[:200]})")
