"""Push an exported folder to the Hugging Face Hub or ModelScope, with a model card that says where it came from.

``check_push`` runs before any work: an upload that would fail (no repo id, offline mode, no route
to the hub, ModelScope's client missing) must not cost a merge and a quantisation first. The card
(README.md) is generated from what the export knows: the base model, the training data and command
(the checkpoint's ``args.json``), the export command, and the eval scores when an ``eval_report.json``
sits beside the checkpoint. The token is read from ``--hub_token`` or the hub client's own login and
never written to the card, the log or the command line shown.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmforge.utils.errors import SetupError

logger = logging.getLogger(__name__)

_ENDPOINTS = {"hf": ("HF_ENDPOINT", "https://huggingface.co"),
              "modelscope": ("MODELSCOPE_DOMAIN", "https://www.modelscope.cn")}
_SECRET_FLAGS = {"hub_token", "api_key"}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(url: str, timeout: float = 5.0) -> str | None:
    """None if a TCP connection to the endpoint's host opens, else why not."""
    if "://" not in url:
        url = "https://" + url
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return None
    except OSError as e:
        return f"{parsed.hostname}:{port} unreachable ({e.strerror or e})"


def check_push(hub: str, hub_model_id: str | None) -> None:
    """Raise before any work if ``--push_to_hub`` cannot succeed from here."""
    if not hub_model_id or "/" not in hub_model_id.strip("/"):
        raise ValueError(f"--push_to_hub needs --hub_model_id as owner/name (got {hub_model_id!r})")
    if hub == "modelscope":
        import importlib.util

        if importlib.util.find_spec("modelscope") is None:
            raise ImportError("--push_to_hub --hub modelscope needs the modelscope package: "
                              "pip install 'lmforge[modelscope]'")
    elif _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        raise SetupError("--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it or "
                           "export without --push_to_hub")
    env, default = _ENDPOINTS[hub]
    why = _reachable(os.environ.get(env) or default)
    if why:
        raise SetupError(f"--push_to_hub: cannot reach the {hub} hub ({why}); check the network, or export "
                           f"without --push_to_hub and upload later")


def command_line(args: Any, defaults: Any) -> str:
    """The ``lmforge export`` command that reproduces ``args`` (flags that differ from the defaults; no secrets)."""
    import dataclasses

    parts = ["lmforge", "export"]
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if f.name in _SECRET_FLAGS or value == getattr(defaults, f.name):
            continue
        values = value if isinstance(value, list) else [value]
        rendered = [json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool) else str(v)
                    for v in values]
        parts += [f"--{f.name}", *rendered]
    return shlex.join(parts)


def _eval_table(report_path: Path) -> list[str]:
    report = json.loads(report_path.read_text(encoding="utf-8"))
    lines = ["| dataset | metric | value |", "| --- | --- | ---: |"]
    for name, ds in (report.get("datasets") or {}).items():
        for metric, value in (ds.get("metrics") or {}).items():
            lines.append(f"| {name} | {metric} | {value:.4f} |" if isinstance(value, float)
                         else f"| {name} | {metric} | {value} |")
    return lines


def find_eval_report(*folders: str | Path | None) -> Path | None:
    """The ``eval_report.json`` that ``lmforge eval`` wrote for a checkpoint (``<ckpt>/eval/``), if any."""
    for folder in folders:
        if not folder:
            continue
        for candidate in (Path(folder) / "eval" / "eval_report.json", Path(folder) / "eval_report.json"):
            if candidate.is_file():
                return candidate
    return None


_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".tsv")


def _hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path or data file: something the hub can link to."""
    return (bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.lower().endswith(_DATA_SUFFIXES)
            and not Path(name).exists())


def model_card(*, base_model: str, train_args: dict[str, Any], export_command: str, fmt: str,
               files: list[str], eval_report: Path | None = None, repo_id: str | None = None) -> str:
    """README.md text: YAML metadata the hubs index, then provenance in prose and tables."""
    hub_base = base_model if _hub_id(base_model) else None
    data = [d for d in train_args.get("dataset") or [] if isinstance(d, str)]
    meta = ["---", "library_name: " + ("gguf" if fmt == "gguf" else "transformers"),
            "tags:", "- lmforge", f"- {fmt}"]
    if hub_base:
        meta.append(f"base_model: {hub_base}")
    hub_data = [d.split("#")[0] for d in data if _hub_id(d.split("#")[0])]
    if hub_data:
        meta += ["datasets:"] + [f"- {d}" for d in hub_data]
    meta.append("---")
    # the repository's name, else the GGUF file's, else the base model's with the format (a folder's first file,
    # args.json when sorted, named every card "args")
    gguf = [f for f in files if f.endswith(".gguf")]
    title = (repo_id.split("/")[-1] if repo_id else Path(gguf[0]).stem if gguf
             else f"{base_model.rstrip('/').split('/')[-1]}-{fmt}")
    body = ["", f"# {title}", "", f"Exported by lmforge ({fmt}).", "", "## Provenance", "",
            f"- Base model: `{base_model}`"]
    if train_args.get("train_type"):
        body.append(f"- Fine-tuning: {train_args['train_type']}"
                    + (f" ({train_args['rlhf_type']})" if train_args.get("rlhf_type") else ""))
    body.append(f"- Training data: {', '.join(f'`{d}`' for d in data) if data else 'not recorded'}")
    if train_args.get("system"):
        body.append(f"- System prompt: `{train_args['system']}`")
    body += ["", "## Commands", ""]
    if train_args:
        keep = {k: v for k, v in train_args.items() if k not in _SECRET_FLAGS and v not in (None, [], {}, "")}
        body += ["<details><summary>Training arguments (<code>args.json</code>)</summary>", "", "```json",
                 json.dumps(keep, indent=2, ensure_ascii=False), "```", "", "</details>", ""]
    body += ["Export:", "", "```bash", export_command, "```", ""]
    body += ["## Files", ""] + [f"- `{f}`" for f in files] + [""]
    if eval_report is not None:
        body += ["## Evaluation", "", f"From `{eval_report.name}` written by `lmforge eval`:", ""]
        body += _eval_table(eval_report) + [""]
    if fmt == "gguf":
        body += ["## Use", "", "```bash", f"llama-cli -m {files[0] if files else 'model.gguf'} -cnv", "```", ""]
    return "\n".join(meta + body)


def push_folder(folder: str | Path, *, hub: str, repo_id: str, token: str | None = None,
                private: bool = False, card: str | None = None) -> str:
    """Upload every file in ``folder`` (and ``card`` as README.md if the folder has none); returns the repo id."""
    folder = Path(folder)
    readme = None if card is None or (folder / "README.md").is_file() else card.encode("utf-8")
    if hub == "modelscope":
        from modelscope.hub.api import HubApi

        api = HubApi()
        if token:
            api.login(token)
        api.create_repo(repo_id, visibility="private" if private else "public", exist_ok=True)
        if readme is not None:
            api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=repo_id)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder))
    else:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True, repo_type="model", private=private)
        if readme is not None:
            api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=repo_id, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model")
    logger.info("Uploaded %s to %s (%s)", folder, repo_id, hub)
    return repo_id
