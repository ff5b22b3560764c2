"""One registry class for every plugin kind.

A registry maps a name to an object (a class, a function, a factory). Built-in entries are
registered by importing a module named at construction time, on first use, so that importing
``lmforge`` stays cheap. ``--external_plugins file.py`` imports a user file that calls
``REGISTRY.register(...)`` on any of the registries below.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of plugins of one kind (templates, datasets, losses, ...)."""

    def __init__(self, kind: str, builtins: str | tuple[str, ...] = ()):
        self.kind = kind
        self._builtins = (builtins,) if isinstance(builtins, str) else tuple(builtins)
        self._loaded = not self._builtins
        self._items: dict[str, T] = {}

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._builtins:
                importlib.import_module(mod)

    def register(self, name: str | None = None, obj: T | None = None, *, overwrite: bool = False):
        """Register ``obj`` under ``name``; without ``obj`` it returns a decorator.

        ``@LOSSES.register("my_loss")`` or ``LOSSES.register("my_loss", fn)``.
        """

        def _add(o: T) -> T:
            key = name or getattr(o, "name", None) or getattr(o, "__name__")
            if key in self._items and not overwrite and self._items[key] is not o:
                raise KeyError(f"{self.kind} {key!r} is already registered; pass overwrite=True to replace it")
            self._items[key] = o
            return o

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> T:
        self._load_builtins()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        self._load_builtins()
        close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._items))}"

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._items)


def load_plugins(paths: list[str] | None) -> None:
    """Import user plugin files (``--external_plugins``); each registers what it defines."""
    for p in paths or []:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"--external_plugins: no such file {p!r}")
        mod_name = f"lmforge_plugin_{path.stem}"
        if mod_name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)


# The registries. Each names the module that registers its built-in entries.
TEMPLATES: Registry[Any] = Registry("template", "lmforge.template.registered")
AGENT_TEMPLATES: Registry[Any] = Registry("agent template", "lmforge.template.agent")
LOSS_SCALES: Registry[Any] = Registry("loss scale", "lmforge.template.loss_scale")
DATASETS: Registry[Any] = Registry("dataset", ("lmforge.dataset.builtin", "lmforge.dataset.shapes",
                                               "lmforge.dataset.task_data", "lmforge.rlhf.data"))
LOSSES: Registry[Callable] = Registry("loss", "lmforge.trainers.losses")
TASK_LOSSES: Registry[Any] = Registry("task loss", "lmforge.trainers.tasks.losses")  # embedding, rerankers
METRICS: Registry[Callable] = Registry("metric", "lmforge.trainers.metrics")
EVAL_METRICS: Registry[Any] = Registry("eval metric",  # lmforge eval (not training)
                                       ("lmforge.eval.metrics", "lmforge.eval.task_metrics"))
OPTIMIZERS: Registry[Callable] = Registry("optimizer", "lmforge.trainers.optimizers")
CALLBACKS: Registry[Any] = Registry("callback", "lmforge.trainers.callbacks")
TUNERS: Registry[Callable] = Registry("tuner", "lmforge.tuners.prepare")
REWARDS: Registry[Callable] = Registry("reward", "lmforge.rlhf.rewards")
MULTI_TURN: Registry[Any] = Registry("multi-turn scheduler", "lmforge.rlhf.multi_turn")
PRMS: Registry[Any] = Registry("process reward model", "lmforge.rlhf.prm")  # step scores, for lmforge sample
AGENTS: Registry[Any] = Registry("agent", ("lmforge.agents.rag", "lmforge.agents.preference",
                                           "lmforge.agents.assistant"))  # lmforge agent / app --agent
MODEL_FAMILIES: Registry[Any] = Registry("model family", "lmforge.model.vision")  # vision-language parts
