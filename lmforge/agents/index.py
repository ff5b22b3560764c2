"""A local vector index over a folder of documents: one folder, rebuilt incrementally.

The folder holds ``index.json`` (the embedder's fingerprint, chunk settings, and each document's SHA-256
and chunk count), ``chunks.jsonl`` (source, character span and text of each chunk, in row order) and
``vectors.npy`` (float32 unit vectors, one row a chunk). ``build_index`` re-embeds only the documents
whose content changed, drops the ones that are gone, and replaces each of the three files atomically,
``index.json`` last; a rebuild stopped between two of them is caught on loading (the row counts of
``chunks.jsonl`` and ``vectors.npy`` differ) and named. Search is an exact cosine
top-k with numpy: a few hundred thousand chunks are milliseconds, and nothing else is to install.

Readers: ``.txt``/``.md``/``.markdown``/``.rst`` as UTF-8 text; ``.pdf`` through pypdf when it is installed
(otherwise the file is skipped and counted). Chunks are paragraphs joined up to ``chunk_size`` characters;
a longer paragraph is cut at sentence ends with about ``chunk_overlap`` characters repeated (starting at a
word). Each chunk is embedded with its document's title (the first Markdown heading, else the file name) in front.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from lmforge.agents.embedders import Embedder, text_hash

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
INDEX_VERSION = 1


class IndexFolderError(ValueError):
    """An index folder that cannot be used as asked; the message names it and what to do."""


def read_document(path: Path) -> str:
    if path.suffix.lower() == ".pdf":
        try:
            from pypdf import PdfReader
        except ImportError:
            raise IndexFolderError(f"{path}: reading PDF needs pypdf (pip install pypdf)") from None
        try:
            return "\n\n".join((page.extract_text() or "") for page in PdfReader(str(path)).pages)
        except Exception as e:  # noqa: BLE001 - pypdf raises many types for damaged files
            raise IndexFolderError(f"{path}: cannot read the PDF ({type(e).__name__}: {e})") from None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise IndexFolderError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def document_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise IndexFolderError(f"--docs {folder}: no such folder")
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not any(s.startswith(".") for s in
                                                                              p.relative_to(folder).parts)]
    return [p for p in files if p.suffix.lower() in (*TEXT_SUFFIXES, ".pdf")]


def title_of(text: str, path: Path) -> str:
    m = re.search(r"^#\s+(.+)$", text, re.MULTILINE)
    return m.group(1).strip() if m else path.stem.replace("_", " ").replace("-", " ")


def chunk_text(text: str, chunk_size: int = 800, overlap: int = 100) -> list[tuple[int, int]]:
    """Character spans of the chunks of ``text`` (see the module docstring)."""
    if chunk_size < 50 or not 0 <= overlap < chunk_size // 2:
        raise ValueError(f"chunk_size must be >= 50 and 0 <= chunk_overlap < chunk_size / 2; got {chunk_size}, {overlap}")
    paras = [(m.start(), m.end()) for m in re.finditer(r"\S(?:.*?\S)?(?=\n\s*\n|\s*\Z)", text, re.DOTALL)]
    spans: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    for s, e in paras:
        if e - s > chunk_size:
            if cur:
                spans.append(cur)
                cur = None
            spans += _split_long(text, s, e, chunk_size, overlap)
        elif cur and e - cur[0] <= chunk_size:
            cur = (cur[0], e)
        else:
            if cur:
                spans.append(cur)
            cur = (s, e)
    if cur:
        spans.append(cur)
    return spans


def _split_long(text: str, s: int, e: int, size: int, overlap: int) -> list[tuple[int, int]]:
    out = []
    while s < e:
        end = min(e, s + size)
        if end < e:  # prefer a sentence end, then a space, in the last third of the window
            cut = max(text.rfind(". ", s + size * 2 // 3, end), text.rfind("\n", s + size * 2 // 3, end))
            if cut <= s:
                cut = text.rfind(" ", s + size * 2 // 3, end)
            end = cut + 1 if cut > s else end
        out.append((s, end))
        if end >= e:
            break
        s = max(end - overlap, s + 1)
        if not text[s - 1].isspace():  # start the overlap at a word, not inside one
            space = text.find(" ", s, end)
            s = space if space != -1 else s
        while s < e and text[s].isspace():
            s += 1
    return out


class VectorIndex:
    """The loaded index: ``search(query, k)`` -> ``[{"source", "text", "score", "start", "end", "title"}]``."""

    def __init__(self, folder: str | Path, embedder: Embedder | None = None):
        import numpy as np

        self.folder = Path(folder)
        meta_path = self.folder / "index.json"
        if not meta_path.is_file():
            raise IndexFolderError(f"--index {self.folder}: no index there (build one with lmforge rag index --docs DIR "
                              f"--index {self.folder})")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        with (self.folder / "chunks.jsonl").open(encoding="utf-8") as fh:
            self.chunks = [json.loads(line) for line in fh]
        self.vectors = np.load(self.folder / "vectors.npy")
        if len(self.chunks) != self.vectors.shape[0]:
            raise IndexFolderError(f"--index {self.folder}: {len(self.chunks)} chunks but {self.vectors.shape[0]} vectors; "
                              "rebuild it with lmforge rag index --rebuild")
        self.embedder = embedder
        if embedder is not None and embedder.fingerprint() != self.meta["embedder"]:
            raise IndexFolderError(f"--index {self.folder} was built with {self.meta['embedder']}, not "
                              f"{embedder.fingerprint()}: its vectors are not comparable (pass the same "
                              "--embedding_model, or rebuild with --rebuild)")

    def __len__(self) -> int:
        return len(self.chunks)

    def search(self, query: str, k: int = 4) -> list[dict[str, Any]]:
        import numpy as np

        if self.embedder is None:
            raise IndexFolderError("this index was loaded without an embedder; cannot embed a query")
        if not len(self.chunks):
            return []
        q = self.embedder.encode([query])[0]
        scores = self.vectors @ q
        top = np.argsort(-scores, kind="stable")[:k]
        return [{**self.chunks[i], "score": round(float(scores[i]), 4)} for i in top]


def build_index(docs: str | Path, folder: str | Path, embedder: Embedder, *, chunk_size: int = 800,
                chunk_overlap: int = 100, rebuild: bool = False) -> dict[str, Any]:
    """Create or update the index at ``folder`` from the documents under ``docs``; returns what changed."""
    import numpy as np

    from lmforge.utils.io import atomic_write_text

    docs, folder = Path(docs), Path(folder)
    old: dict[str, Any] = {}
    old_chunks: list[dict] = []
    old_vectors = None
    settings = {"embedder": embedder.fingerprint(), "chunk_size": chunk_size, "chunk_overlap": chunk_overlap}
    if (folder / "index.json").is_file() and not rebuild:
        prev = VectorIndex(folder)
        if any(prev.meta.get(k) != v for k, v in settings.items()):
            raise IndexFolderError(f"--index {folder} was built with {json.dumps({k: prev.meta.get(k) for k in settings})}; "
                              f"now {json.dumps(settings)}: pass --rebuild to re-embed everything")
        old, old_chunks, old_vectors = prev.meta["files"], prev.chunks, prev.vectors
    rows_of: dict[str, list[int]] = {}
    for i, c in enumerate(old_chunks):
        rows_of.setdefault(c["source"], []).append(i)
    files: dict[str, Any] = {}
    chunks: list[dict] = []
    parts: list[Any] = []
    embedded_chunks = 0
    stats = {"unchanged": 0, "added": 0, "updated": 0, "removed": 0, "skipped": []}
    for path in document_files(docs):
        rel = path.relative_to(docs).as_posix()
        try:
            text = read_document(path)
        except IndexFolderError as e:
            stats["skipped"].append(str(e))
            continue
        digest = text_hash(text)
        if rel in old and old[rel]["sha256"] == digest and not rebuild:
            rows = rows_of.get(rel, [])
            chunks += [old_chunks[i] for i in rows]
            parts.append(old_vectors[rows])
            files[rel] = old[rel]
            stats["unchanged"] += 1
            continue
        stats["updated" if rel in old else "added"] += 1
        title = title_of(text, path)
        new = [{"source": rel, "title": title, "start": s, "end": e, "text": text[s:e]}
               for s, e in chunk_text(text, chunk_size, chunk_overlap)]
        embedded = embedder.encode([f"{title}\n{c['text']}" for c in new]) if new else \
            np.zeros((0, embedder.dim), np.float32)
        chunks += new
        parts.append(np.asarray(embedded, np.float32).reshape(len(new), embedder.dim))
        files[rel] = {"sha256": digest, "chunks": len(new)}
        embedded_chunks += len(new)
    stats["removed"] = len(set(old) - set(files))
    vectors = np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".vectors.{os.getpid()}.npy"
    np.save(tmp, vectors)
    os.replace(tmp, folder / "vectors.npy")
    atomic_write_text(folder / "chunks.jsonl", "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chunks))
    meta = {"version": INDEX_VERSION, **settings, "docs": str(docs.resolve()), "built": time.strftime("%Y-%m-%d %H:%M:%S"),
            "files": files}
    atomic_write_text(folder / "index.json", json.dumps(meta, indent=2, ensure_ascii=False))
    stats.update(documents=len(files), chunks=len(chunks), embedded=embedded_chunks)
    return stats
