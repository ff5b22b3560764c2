"""Shared by the server tests: a small deterministic engine and a server running it.

:class:`EchoEngine` is a real :class:`InferEngine` (not a mock): it "generates" the last user
message's words in reverse order, token by token through the built-in tokenizer, with real
streaming, stop strings, max_tokens, n, seeds, logprobs and token counts. It lets the
server-behaviour tests (queueing, disconnects, errors, auth, shutdown) run in milliseconds and
check exact outputs. The same behaviours are checked against the real hf engine in
test_serve_hf.py. Control words in the last user message: ``sleep:S`` waits S seconds per token,
``fail`` raises after the first token.
"""
from __future__ import annotations

import contextlib
import random
import threading
import time
from typing import Iterator

from tokenizers import Tokenizer

from lmforge.arguments import DeployArguments
from lmforge.infer.base import InferEngine
from lmforge.infer.errors import InferRequestError
from lmforge.infer.protocol import (ChatCompletionResponse, ChatCompletionStreamResponse, ChatMessage, Choice,
                                    ChoiceLogprobs, DeltaMessage, InferRequest, RequestConfig, StreamChoice,
                                    TokenLogprob, TopLogprob, Usage)
from lmforge.model.builtin import TOKENIZER_DIR
from lmforge.serve import create_app
from lmforge.serve.server import ServerThread

_TOKENIZER = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


def encode(text: str) -> list[int]:
    return _TOKENIZER.encode(text, add_special_tokens=False).ids


def echo_reply(text: str, *, adapter: str | None = None, seed: int | None = None, sampled: bool = False) -> str:
    """What EchoEngine answers: words reversed (shuffled when sampling), upper-cased by adapter 'shout'."""
    words = [w for w in text.split() if not w.startswith("sleep:")]
    if sampled:
        random.Random(seed).shuffle(words)
    else:
        words.reverse()
    reply = " ".join(words)
    return reply.upper() if adapter == "shout" else reply


class EchoEngine(InferEngine):
    model_name = "echo-model"
    supports_raw_prompt = True

    def __init__(self, max_model_len: int = 256) -> None:
        self.adapters = {"shout": "/adapters/shout"}
        self.max_model_len = max_model_len
        self.active = 0  # generations running now (a stopped stream must bring this back to 0)
        self.started = 0
        self._lock = threading.Lock()

    # ---- encoding -------------------------------------------------------------------------------
    def _prompt_ids(self, request: InferRequest) -> list[int]:
        prompt = getattr(request, "prompt", None)
        if prompt is not None:
            if isinstance(prompt, list):
                if any(not 0 <= t < _TOKENIZER.get_vocab_size() for t in prompt):
                    raise InferRequestError("prompt holds token ids outside the vocabulary")
                return list(prompt)
            if not prompt:
                raise InferRequestError("the prompt is empty")
            return encode(prompt)
        if request.messages[-1].role not in ("user", "tool"):
            raise InferRequestError(f"the last message is from {request.messages[-1].role!r}; "
                                    "the model replies to a user or tool message")
        text = "".join(f"<|im_start|>{m.role}\n{m.content or ''}<|im_end|>\n" for m in request.messages)
        return encode(text + "<|im_start|>assistant\n")

    def count_prompt_tokens(self, request: InferRequest) -> int:
        return len(self._prompt_ids(request))

    def _source_text(self, request: InferRequest) -> str:
        prompt = getattr(request, "prompt", None)
        if prompt is not None:
            return prompt if isinstance(prompt, str) else _TOKENIZER.decode(prompt)
        return str(request.messages[-1].content or "")

    # ---- generation -----------------------------------------------------------------------------
    def _tokens(self, request: InferRequest, cfg: RequestConfig, k: int) -> list[int]:
        seed = None if cfg.seed is None else cfg.seed + k
        return encode(echo_reply(self._source_text(request), adapter=request.adapter, seed=seed,
                                 sampled=cfg.temperature > 0))

    def infer_stream(self, request: InferRequest, request_config: RequestConfig | None = None
                     ) -> Iterator[ChatCompletionStreamResponse]:
        cfg = request_config or RequestConfig()
        if request.adapter and request.adapter not in self.adapters:
            raise InferRequestError(f"unknown adapter {request.adapter!r}")
        prompt_ids = self._prompt_ids(request)
        if len(prompt_ids) >= self.max_model_len:
            raise InferRequestError(f"the prompt is {len(prompt_ids)} tokens but max_model_len is "
                                    f"{self.max_model_len}")
        return self._stream(request, cfg, len(prompt_ids))

    def _stream(self, request: InferRequest, cfg: RequestConfig, prompt_len: int
                ) -> Iterator[ChatCompletionStreamResponse]:
        source = self._source_text(request)
        delay = next((float(w[6:]) for w in source.split() if w.startswith("sleep:")), 0.0)
        budget = min(cfg.max_tokens or self.max_model_len, self.max_model_len - prompt_len)

        def chunk(choices, usage=None):
            return ChatCompletionStreamResponse(id="echo", model=self.model_name, choices=choices, usage=usage)

        with self._lock:
            self.active += 1
            self.started += 1
        try:
            yield chunk([StreamChoice(index=k, delta=DeltaMessage(role="assistant", content=""))
                         for k in range(cfg.n)])
            completion = 0
            for k in range(cfg.n):
                ids, sent, reason = self._tokens(request, cfg, k), "", "length"
                for step in range(min(budget, len(ids) + 1)):
                    if delay:
                        time.sleep(delay)
                    if step == 1 and source.strip().startswith("fail"):
                        raise RuntimeError("the echo engine was asked to fail")
                    if step == len(ids):  # end of the reply: the end-of-turn token
                        reason, step = "stop", step + 1
                        completion += 1
                        break
                    completion += 1
                    text = _TOKENIZER.decode(ids[:step + 1])
                    cut = min((i for i in (text.find(s) for s in cfg.stop) if i >= 0), default=-1)
                    if cut >= 0:
                        text, reason = text[:cut], "stop"
                    delta, sent = text[len(sent):], text
                    lp = None
                    if cfg.logprobs:
                        piece = _TOKENIZER.decode([ids[step]])
                        lp = ChoiceLogprobs(content=[TokenLogprob(
                            token=piece, logprob=-0.25, top_logprobs=[TopLogprob(token=piece, logprob=-0.25)]
                            [:cfg.top_logprobs or 0])])
                    if delta or lp:
                        yield chunk([StreamChoice(index=k, delta=DeltaMessage(content=delta), logprobs=lp)])
                    if reason == "stop":
                        break
                yield chunk([StreamChoice(index=k, delta=DeltaMessage(), finish_reason=reason)])
            yield chunk([], Usage(prompt_tokens=prompt_len, completion_tokens=completion,
                                  total_tokens=prompt_len + completion))
        finally:
            with self._lock:
                self.active -= 1

    def infer(self, requests: list[InferRequest], request_config: RequestConfig | None = None, *,
              use_tqdm: bool | None = None) -> list[ChatCompletionResponse]:
        out = []
        for request in requests:
            texts: dict[int, str] = {}
            reasons: dict[int, str] = {}
            logprobs: dict[int, list[TokenLogprob]] = {}
            usage = Usage()
            for ch in self.infer_stream(request, request_config):
                usage = ch.usage or usage
                for c in ch.choices:
                    texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
                    if c.finish_reason:
                        reasons[c.index] = c.finish_reason
                    if c.logprobs:
                        logprobs.setdefault(c.index, []).extend(c.logprobs.content)
            want_lp = bool(request_config and request_config.logprobs)
            out.append(ChatCompletionResponse(model=self.model_name, usage=usage, choices=[
                Choice(index=k, message=ChatMessage(role="assistant", content=texts[k]), finish_reason=reasons.get(k),
                       logprobs=ChoiceLogprobs(content=logprobs.get(k, [])) if want_lp else None)
                for k in sorted(texts)]))
        return out


def wait_until(condition, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@contextlib.contextmanager
def echo_server(engine: EchoEngine | None = None, **deploy_kwargs) -> Iterator[ServerThread]:
    """An EchoEngine served on a free loopback port; deploy_kwargs are DeployArguments fields."""
    engine = engine or EchoEngine()
    args = DeployArguments(**deploy_kwargs)
    with ServerThread(create_app(engine, args), shutdown_timeout=deploy_kwargs.get("shutdown_timeout", 5.0),
                      max_connections=args.max_connections, header_timeout=args.body_timeout) as srv:
        yield srv
