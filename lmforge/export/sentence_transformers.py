"""An embedding checkpoint as a sentence-transformers model folder (LoRA adapters merged in).

The folder is a plain transformers model (``config.json``, safetensors, tokenizer) plus the files
sentence-transformers reads to rebuild its module pipeline: ``modules.json`` (Transformer ->
Pooling -> Normalize), ``sentence_bert_config.json`` (the longest input), ``1_Pooling/config.json``
(the pooling the model was trained with: last token, mean or CLS) and
``config_sentence_transformers.json`` (the query/document prompts as named prompts, cosine
similarity). So ``SentenceTransformer(folder).encode(texts)`` gives the vectors lmforge's engine
gives, and ``encode(q, prompt_name="query")`` the ones of ``input_type="query"``. The files are
written here rather than by sentence-transformers itself, so exporting does not need that package.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lmforge.model.tasks import ST_POOLING_KEYS

logger = logging.getLogger(__name__)

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def write_sentence_transformers_files(folder: Path, *, hidden_size: int, pooling: str, max_seq_length: int,
                                      query_prompt: str = "", document_prompt: str = "") -> None:
    """The sentence-transformers files of an embedding model saved in ``folder`` (see the module docstring)."""
    from lmforge.utils.io import atomic_write_text

    def write(name: str, value: Any) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(value, indent=2))

    write("modules.json", MODULES)
    write("sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    write("1_Pooling/config.json", {
        "word_embedding_dimension": hidden_size,
        **{key: mode == pooling for mode, key in ST_POOLING_KEYS.items()},
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "include_prompt": True})
    (folder / "2_Normalize").mkdir(exist_ok=True)
    write("config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": {"query": query_prompt, "document": document_prompt},
        "default_prompt_name": None, "similarity_fn_name": "cosine"})


def export_sentence_transformers(src: Any, out: Path, *, torch_dtype: str = "auto", hub: str = "hf",
                                 revision: str | None = None, trust_remote_code: bool = False,
                                 max_shard_size: str = "5GB") -> Path:
    """Save the embedding model ``src`` (a resolved checkpoint; adapters merged) to ``out`` for
    sentence-transformers."""
    from lmforge.export.merge import _checkpoint_dtype, build_dir, check_merge_changes, save_tokenizer_and_args
    from lmforge.infer.checkpoint import attach_adapters
    from lmforge.model import get_model_tokenizer, resolve_model_dir
    from lmforge.model.tasks import default_pooling

    dtype = _checkpoint_dtype(src.model, hub, revision, trust_remote_code) if torch_dtype == "auto" else torch_dtype
    model, tokenizer = get_model_tokenizer(src.model, hub=hub, revision=revision, torch_dtype=dtype,
                                           trust_remote_code=trust_remote_code, device="cpu", auto_class="AutoModel")
    if src.adapters:
        peft_model = attach_adapters(model, src.adapters)
        check_merge_changes(peft_model, list(src.adapters))
        model = peft_model.merge_and_unload()
    if hasattr(model.config, "lmforge_model"):  # a run-time note of the loader, not part of this model
        del model.config.lmforge_model
    trained = src.train_args
    pooling = trained.get("pooling") or default_pooling(model.config, resolve_model_dir(src.model, hub=hub,
                                                                                         revision=revision))
    max_len = trained.get("max_length") or getattr(model.config, "max_position_embeddings", None) or 512
    with build_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        save_tokenizer_and_args(tmp, tokenizer, src, out)
        write_sentence_transformers_files(tmp, hidden_size=model.config.hidden_size, pooling=pooling,
                                          max_seq_length=int(max_len), query_prompt=trained.get("query_prompt") or "",
                                          document_prompt=trained.get("document_prompt") or "")
    logger.info("Embedding model (%s pooling) saved for sentence-transformers to %s", pooling, out)
    return out
