"""Rollouts for online RL: sampled trajectories from any engine, weight sync, and the rollout-server client.

- :func:`run_rollouts` asks an :class:`~lmforge.infer.base.InferEngine` for ``G`` samples per prompt
  (one ``infer`` call with ``n=G``) and, with a :class:`~lmforge.rlhf.multi_turn.MultiTurnScheduler`,
  drives each trajectory through further turns. The first turn is sent as token ids when the caller
  has them (the trainer's own encoding), so the ids trained on are the ids sampled.
- :func:`policy_named_weights` yields a policy's weights under plain transformers names, with LoRA
  deltas merged in (``W + scale B A``), which any engine holding a plain copy of the model can load.
- :class:`RolloutClient` is an engine that lives in another process (``lmforge rollout``): it
  generates over HTTP and takes weight updates as safetensors bytes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from lmforge.infer.base import InferEngine, infer_each
from lmforge.infer.errors import InferRequestError
from lmforge.infer.protocol import ChatCompletionResponse, InferRequest, RequestConfig

__all__ = ["RolloutPrompt", "Episode", "Sampled", "AsyncRollouts", "run_rollouts", "policy_named_weights",
           "RolloutClient", "RolloutError",
           "tensors_to_bytes", "bytes_to_tensors"]

logger = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """A rollout that cannot go on (an engine that returns no token ids, a rollout server that fails)."""


@dataclass
class RolloutPrompt:
    """One prompt to sample: canonical ``messages`` ending on a user (or tool) turn, its ``tools``, the
    token ids of its encoding when the caller has them, and the image and video references its ``<image>`` and
    ``<video>`` tags stand for (every request of its trajectories carries them, as the ids hold their tokens)."""

    messages: list[dict]
    tools: Any = None
    prompt_ids: list[int] | None = None
    row: dict[str, Any] = field(default_factory=dict)  # the dataset row's extra columns (for the scheduler)
    images: list[str] = field(default_factory=list)
    videos: list[list[str]] = field(default_factory=list)  # each its frames, or [its file]


@dataclass
class Episode:
    """One sampled trajectory.

    ``completion_ids`` are the exact sampled ids of a single-turn episode; a multi-turn one
    (``multi_turn``) is re-encoded from ``messages`` by the trainer, whose template labels mark the
    model's own turns. ``completion`` is the text of the last reply (what outcome rewards judge).
    """

    prompt_index: int
    messages: list[dict]
    prompt_ids: list[int] | None
    completion_ids: list[int]
    completion: str
    finish_reason: str | None
    turns: int = 1
    generated_tokens: int = 0
    multi_turn: bool = False
    sampling_logps: list[float] | None = None  # the engine's log-probs of completion_ids, when asked for
    sample_index: int = 0  # which of its prompt's samples this is


class Sampled(NamedTuple):
    """One micro-batch of rollouts: prompts, ``G`` episodes per prompt, the reward table [N, F] (NaN: a function
    did not score that completion), generation seconds and generated tokens."""

    prompts: list[RolloutPrompt]
    episodes: list[Episode]
    table: Any
    seconds: float
    tokens: int


class AsyncRollouts:
    """Rollouts of one optimizer step's micro-batches, generated in a background thread (``--async_generate``).

    ``sample(rows)`` must touch nothing the training thread changes: it runs against an engine with its own
    copy of the weights (pushed before this starts), so the next step's samples are drawn while this step
    trains. ``result()`` waits and returns one result per micro-batch, or raises what the thread raised.
    """

    def __init__(self, sample: Any, micro_batches: list[list[dict[str, Any]]]):
        import threading

        self._out: list[Any] = []
        self._error: BaseException | None = None

        def work() -> None:
            try:
                self._out = [sample(rows) for rows in micro_batches]
            except BaseException as e:  # noqa: BLE001 - handed to the training thread in result()
                self._error = e

        self._thread = threading.Thread(target=work, name="lmforge-async-rollouts", daemon=True)
        self._thread.start()

    def result(self) -> list[Any]:
        self._thread.join()
        if self._error is not None:
            raise RolloutError(f"background rollout failed: {type(self._error).__name__}: {self._error}") \
                from self._error
        return self._out


def _first_request(p: RolloutPrompt, raw_ids: bool, seed: int | None) -> InferRequest:
    if p.prompt_ids is not None and raw_ids:
        from lmforge.serve.schemas import PromptRequest

        return PromptRequest(prompt=list(p.prompt_ids), tools=p.tools or None, seed=seed, images=list(p.images),
                             videos=[list(v) for v in p.videos])
    return InferRequest(messages=p.messages, tools=p.tools or None, seed=seed, images=list(p.images),
                        videos=[list(v) for v in p.videos])


def stable_seed(*parts: Any) -> int:
    """A sampling seed from ``parts`` (step, prompt, ...) that any process computes alike."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1  # 31 bits: engines may derive further seeds from it


def _infer_tolerant(engine: InferEngine, requests: list[InferRequest], cfg: RequestConfig
                    ) -> list[ChatCompletionResponse | None]:
    """``engine.infer``, but a request the engine refuses (a conversation grown past ``max_model_len``)
    gets None instead of failing the rest."""
    out = []
    for r in infer_each(engine, requests, cfg):
        if isinstance(r, InferRequestError):
            logger.debug("rollout: request dropped from this turn: %s", r)
            r = None
        out.append(r)
    return out


def run_rollouts(engine: InferEngine, prompts: Sequence[RolloutPrompt], config: RequestConfig, *,
                 num_generations: int, scheduler: Any = None, seeds: Sequence[int] | None = None) -> list[Episode]:
    """``num_generations`` trajectories per prompt, grouped by prompt (prompt 0's first).

    Without a scheduler each trajectory is one reply. With one, every trajectory goes on turn by
    turn (``n=1`` requests, all live trajectories in one ``infer`` call per turn) until the scheduler
    says it is finished. ``seeds`` (one per prompt) make each prompt's samples its own, whatever batch
    or process it is sampled in; later turns get seeds derived from it.
    """
    from lmforge.rlhf.multi_turn import reply_messages

    raw_ids = getattr(engine, "supports_raw_prompt", True)
    first = engine.infer([_first_request(p, raw_ids, seeds[k] if seeds else None) for k, p in enumerate(prompts)],
                         config.model_copy(update={"n": num_generations}), use_tqdm=False)
    episodes: list[Episode] = []
    live: list[tuple[Episode, Any]] = []  # trajectories and the reply they just got
    for k, (p, resp) in enumerate(zip(prompts, first)):
        if len(resp.choices) != num_generations:
            raise RolloutError(f"the engine returned {len(resp.choices)} samples for prompt {k}; asked for "
                               f"{num_generations}")
        for g, choice in enumerate(resp.choices):
            if choice.token_ids is None:
                raise RolloutError(f"the {type(engine).__name__} engine returns no token ids; GRPO needs them")
            e = Episode(k, list(p.messages), p.prompt_ids, list(choice.token_ids), choice.message.content or "",
                        choice.finish_reason, generated_tokens=len(choice.token_ids), sample_index=g)
            if config.logprobs:
                if choice.logprobs is None or choice.logprobs.content is None:
                    raise RolloutError(f"the {type(engine).__name__} engine returned no log-probs; asked for them")
                e.sampling_logps = [t.logprob for t in choice.logprobs.content]
            episodes.append(e)
            live.append((e, choice))
    if scheduler is None:
        for e in episodes:
            e.messages.append({"role": "assistant", "content": e.completion})
        return episodes
    turn_cfg = config.model_copy(update={"n": 1})
    while live:
        follow: list[Episode] = []
        for e, choice in live:
            e.messages.extend(reply_messages(choice))
            if scheduler.check_finished(e.messages, choice, e.turns):
                continue
            nxt = scheduler.step(e.messages, choice, prompts[e.prompt_index].row)
            if nxt:
                e.messages.extend(nxt)
                e.multi_turn = True
                follow.append(e)
        requests = [InferRequest(messages=e.messages, tools=prompts[e.prompt_index].tools or None,
                                 images=list(prompts[e.prompt_index].images),
                                 videos=[list(v) for v in prompts[e.prompt_index].videos],
                                 seed=stable_seed(seeds[e.prompt_index], e.sample_index, e.turns) if seeds else None)
                    for e in follow]
        live = []
        for e, resp in zip(follow, _infer_tolerant(engine, requests, turn_cfg) if follow else []):
            if resp is None:  # too long to go on: the trajectory ends on the tool/user turn
                e.finish_reason = "length"
                continue
            choice = resp.choices[0]
            e.turns += 1
            e.generated_tokens += len(choice.token_ids or ())
            e.completion, e.finish_reason = choice.message.content or "", choice.finish_reason
            live.append((e, choice))
    return episodes


# ----------------------------------------------------------------------------- weights


def policy_named_weights(model: Any) -> Iterator[tuple[str, Any]]:
    """The policy's weights under the names of the plain transformers model, LoRA merged in.

    For a PeftModel: each LoRA layer's weight is ``base + delta`` of the active adapters (computed
    on the fly; the model is not merged, so nothing drifts), ``modules_to_save`` copies replace the
    originals, and adapter-only parameters are left out. DoRA and quantized (QLoRA) bases are not
    supported (their merged weight is not a plain sum); use the colocated ``hf`` engine for them.
    """
    import torch

    if not hasattr(model, "peft_config"):
        for name, p in model.named_parameters():
            yield name, p.detach()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    lora = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for name, p in base.named_parameters():
            if ".lora_" in name or ".original_module." in name:
                continue
            owner, _, leaf = name.rpartition(".")
            if owner.endswith(".base_layer") and owner[:-len(".base_layer")] in lora:
                mod_name = owner[:-len(".base_layer")]
                layer = lora[mod_name]
                value = p.detach()
                if leaf == "weight" and not getattr(layer, "merged", False):
                    if any(layer.use_dora.get(a, False) for a in layer.active_adapters):
                        raise NotImplementedError("pushing DoRA weights to a separate engine is not supported; "
                                                  "use --infer_backend hf (colocated)")
                    if getattr(p, "quant_state", None) is not None or p.dtype not in (
                            torch.float32, torch.float16, torch.bfloat16):
                        raise NotImplementedError("pushing a quantized (QLoRA) base to a separate engine is not "
                                                  "supported; use --infer_backend hf (colocated)")
                    for a in layer.active_adapters:
                        if a in layer.lora_A:
                            value = value + layer.get_delta_weight(a).to(value.dtype)
                yield f"{mod_name}.{leaf}", value
            else:
                yield re.sub(r"\.modules_to_save\.[^.]+\.", ".", name), p.detach()


def tensors_to_bytes(named: dict[str, Any]) -> bytes:
    """safetensors bytes of CPU, contiguous copies of ``named``."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in named.items()})


def bytes_to_tensors(data: bytes) -> dict[str, Any]:
    from safetensors.torch import load

    return load(data)


# ----------------------------------------------------------------------------- rollout-server client


def _request_json(request: InferRequest) -> dict[str, Any]:
    out = request.model_dump(mode="json", exclude_none=True)
    if "prompt" in out and not out.get("messages"):
        out.pop("messages", None)  # a token-id prompt has no messages (an empty list would not validate)
    return out


class RolloutClient(InferEngine):
    """An engine served by ``lmforge rollout`` at ``url``: ``infer`` generates there (token ids included),
    ``update_weights`` sends tensors as safetensors in chunks of at most ``chunk_bytes``."""

    supports_raw_prompt = True

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 600.0,
                 chunk_bytes: int = 256 * 1024 * 1024, wait: float = 0.0):
        self.url = url.rstrip("/")
        self.api_key, self.timeout, self.chunk_bytes = api_key, timeout, chunk_bytes
        info = self._wait_ready(wait)
        self.model_name = info.get("model", "rollout")
        self.max_model_len = int(info.get("max_model_len") or 0)
        self.adapters = {}
        self.template = None

    def _call(self, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        req = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET")
        if body is not None:
            req.add_header("Content-Type", content_type)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                # the server's queue is full (it admits generate calls like chat requests): wait as it asks
                if e.code == 429 and time.monotonic() < deadline:
                    e.read()
                    time.sleep(min(float(e.headers.get("Retry-After") or 1), 30.0))
                    continue
                return self._raise(path, e)
            except (urllib.error.URLError, OSError) as e:
                raise RolloutError(f"rollout server {self.url}{path}: {e} (is `lmforge rollout` running there? "
                                   "check --rollout_url)") from None

    def _raise(self, path: str, e: urllib.error.HTTPError) -> Any:
        """The server's error as an InferRequestError (a request it refused, by index) or a RolloutError."""
        detail = e.read().decode("utf-8", "replace")
        try:
            err = json.loads(detail)["error"]
        except (ValueError, KeyError, TypeError):
            err = None
        if err and e.code == 400 and path == "/rollout/generate":  # a request the engine refused: say which
            m = re.fullmatch(r"requests\[(\d+)\]", err.get("param") or "")
            raise InferRequestError(err.get("message", detail), index=int(m.group(1)) if m else None) from None
        message = err.get("message", detail) if err else detail
        raise RolloutError(f"rollout server {self.url}{path}: HTTP {e.code}: {message[:500]}") from None

    def _wait_ready(self, wait: float) -> dict[str, Any]:
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._call("/rollout/info")
            except RolloutError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)

    def infer(self, requests: list[InferRequest], request_config: RequestConfig | None = None, *,
              use_tqdm: bool | None = None) -> list[ChatCompletionResponse]:
        cfg = request_config or RequestConfig()
        body = {"requests": [_request_json(r) for r in requests],
                "config": cfg.model_dump(mode="json")}
        out = self._call("/rollout/generate", json.dumps(body).encode("utf-8"))
        return [ChatCompletionResponse.model_validate(r) for r in out["responses"]]

    def infer_stream(self, request: InferRequest, request_config: RequestConfig | None = None):
        raise NotImplementedError("RolloutClient does not stream; use infer")

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        chunk: dict[str, Any] = {}
        size = 0
        for name, t in named_tensors:
            chunk[name] = t
            size += t.numel() * t.element_size()
            if size >= self.chunk_bytes:
                self._send(chunk)
                chunk, size = {}, 0
        if chunk:
            self._send(chunk)

    def _send(self, chunk: dict[str, Any]) -> None:
        self._call("/rollout/update_weights", tensors_to_bytes(chunk), "application/octet-stream")
