"""Arguments of the toolkit commands: ``env``, ``presets``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lmforge.arguments.base import field


@dataclass
class EnvArguments:
    """Check that this machine can run lmforge: lmforge env [--json]."""

    json: bool = field(False, "print the report as JSON (for scripts) instead of a table")
    output_dir: str = field("output", "where training will write (its free disk space is checked)")
    model: Optional[str] = field(None, "also check a local model folder (its tokenizer files against the installed "
                                       "transformers)")
    min_free_gb: float = field(5.0, "warn when a checked folder has less free disk than this (GiB); under 1 GiB "
                                    "is an error")


@dataclass
class PresetsArguments:
    """List the training presets: lmforge presets (use one with --preset NAME on pt/sft/rlhf)."""

    json: bool = field(False, "print the presets as JSON")
