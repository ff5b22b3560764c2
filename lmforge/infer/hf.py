"""The ``hf`` engine: transformers' ``generate`` on any device, the reference the other engines match.

How a batch is generated:

- requests are encoded by the lmforge Template, grouped by LoRA adapter, sorted by length and
  left-padded into batches of at most ``max_batch_size`` sequences (each request repeated ``n`` times);
- ``generate`` runs greedy decoding, and one logits processor (:class:`_Sampler`) does all the
  sampling itself: penalties, temperature, top-k/top-p/min-p, then a draw from a
  ``torch.Generator`` per request when a seed is given, so a seeded request gives the same
  samples whichever batch it lands in (``generate``'s own sampling draws for the whole batch from
  one global stream). The processor returns a one-hot score, so ``generate``'s argmax takes its choice;
- a stopping criterion ends each sequence at its own ``max_tokens`` (prompts differ in room left
  within ``max_model_len``), at a stop string, or when a stream is cancelled.
"""
from __future__ import annotations

import copy
import logging
import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.streamers import BaseStreamer

from lmforge.infer.base import InferEngine
from lmforge.infer.checkpoint import attach_adapters, resolve_model_source
from lmforge.infer.convert import parse_request, to_canonical_row
from lmforge.infer.errors import InferRequestError, PromptTooLongError
from lmforge.infer.protocol import (ChatCompletionResponse, ChatCompletionStreamResponse, ChatMessage, Choice,
                                    ChoiceLogprobs, Function, InferRequest, RequestConfig, TokenLogprob, ToolCall,
                                    TopLogprob, Usage)
from lmforge.infer.reply_stream import ReplyStream
from lmforge.infer.utils import StopStrings, TokenPieces

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    """One validated request: where it came from, its prompt ids and how many tokens it may add."""

    index: int | None
    request: InferRequest
    input_ids: list[int]
    max_tokens: int
    images: list[str] = field(default_factory=list)  # image references of a vision-language prompt, in order
    videos: list[list[str]] = field(default_factory=list)  # its videos (frame references or [a video file])


@dataclass
class _Row:
    """One generated sequence (one choice)."""

    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


def repetition_penalty(input_ids: torch.Tensor, scores: torch.Tensor, penalty: float,
                       pad_lens: torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty (every id seen in prompt or output: positive scores / penalty, negative x
    penalty) over left-padded rows, the first ``pad_lens[i]`` ids of row i not counted. Written here because
    ``RepetitionPenaltyLogitsProcessor`` takes per-row ignore lengths only in recent transformers 5 releases
    (5.17 refuses a tensor), and the hf engine supports every 5.x."""
    vocab = scores.shape[-1]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    padding = positions[None, :] < pad_lens.to(input_ids.device)[:, None]
    ids = input_ids.masked_fill(padding, vocab)  # padding points at a spare column, dropped at the end
    wide = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)
    seen = wide.gather(1, ids)
    wide = wide.scatter(1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))
    return wide[:, :vocab]


class _Sampler(LogitsProcessor):
    """Picks every next token itself (see the module docstring) and records its logprobs if asked."""

    def __init__(self, cfg: RequestConfig, seeds: list[int | None], prompt_len: int, pad_lens: torch.Tensor,
                 device: torch.device, banned: Sequence[int] = ()):
        self.n = cfg.n
        # a vision-language model's image/video placeholders: a reply holding one could not be encoded again
        # (its placeholder would ask for pixels that do not exist), so they are never sampled
        self.banned = torch.tensor(sorted(banned), dtype=torch.long, device=device) if banned else None
        self.prompt_len = prompt_len
        self.greedy = cfg.temperature == 0
        self.rep = float(cfg.repetition_penalty) if cfg.repetition_penalty != 1.0 else None
        self.pad_lens = pad_lens
        self.presence, self.frequency = cfg.presence_penalty, cfg.frequency_penalty
        self.warpers: list[LogitsProcessor] = []
        if not self.greedy:
            if cfg.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(float(cfg.temperature)))
            if cfg.top_k > 0:
                self.warpers.append(TopKLogitsWarper(cfg.top_k))
            if cfg.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(float(cfg.top_p)))
            if cfg.min_p > 0.0:
                self.warpers.append(MinPLogitsWarper(float(cfg.min_p)))
        # One generator per seeded request (its own seed, else the config's): its n samples come from it in
        # order, unaffected by other requests. Unseeded requests draw from torch's global generator.
        self.generators = None
        if not self.greedy and any(sd is not None for sd in seeds):
            self.generators = [None if sd is None else torch.Generator(device=device).manual_seed(sd) for sd in seeds]
        self.top_k_logprobs = (cfg.top_logprobs or 0) if cfg.logprobs else -1
        self.records: list[tuple[torch.Tensor, ...]] = []  # per step: chosen id, its logprob, top ids, top logprobs

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logprobs = scores.log_softmax(-1) if self.top_k_logprobs >= 0 else None
        if self.banned is not None:
            scores = scores.index_fill(1, self.banned, float("-inf"))
        if self.rep is not None:
            scores = repetition_penalty(input_ids, scores, self.rep, self.pad_lens)
        if self.presence or self.frequency:
            generated = input_ids[:, self.prompt_len:]
            if generated.numel():
                ones = torch.ones_like(generated, dtype=scores.dtype)
                counts = torch.zeros_like(scores).scatter_add_(1, generated, ones)
                scores = scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
        if self.greedy:  # generate() takes the argmax of what is returned; only logprobs need it here
            if logprobs is not None:
                self._record(logprobs, scores.argmax(-1))
            return scores
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = scores.softmax(-1)
        if self.generators is None:
            tokens = torch.multinomial(probs, 1).squeeze(1)
        else:
            tokens = torch.cat([torch.multinomial(probs[j * self.n:(j + 1) * self.n], 1, generator=g)
                                for j, g in enumerate(self.generators)]).squeeze(1)
        if logprobs is not None:
            self._record(logprobs, tokens)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens[:, None], 0.0)

    def _record(self, logprobs: torch.Tensor, tokens: torch.Tensor) -> None:
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        top = logprobs.topk(self.top_k_logprobs, dim=-1) if self.top_k_logprobs > 0 else None
        self.records.append((tokens, chosen, *((top.indices, top.values) if top is not None else (None, None))))


class _StopCriteria(StoppingCriteria):
    """Ends each sequence at its own token budget, at a stop string, or when the consumer cancels."""

    def __init__(self, prompt_len: int, row_max: list[int], device: torch.device, stop: StopStrings,
                 stop_ids: set[int], decode: Any, cancel: threading.Event | None):
        self.prompt_len = prompt_len
        self.row_max = row_max
        self.row_max_t = torch.tensor(row_max, device=device)
        self.stop, self.stop_ids, self.decode, self.cancel = stop, stop_ids, decode, cancel
        # A stop string of L characters spans at most 4L byte-level tokens; a few more for context.
        self.window = 4 * stop.max_len + 4
        self.stop_at: list[int | None] = [None] * len(row_max)  # generated length when a stop string appeared
        self.ended = [False] * len(row_max)
        self.cancelled = False

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        gen_len = input_ids.shape[1] - self.prompt_len
        if self.cancel is not None and self.cancel.is_set():
            self.cancelled = True
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done = self.row_max_t <= gen_len
        if self.stop:  # needs the text on the host: only paid for when stop strings are given
            start = max(self.prompt_len, input_ids.shape[1] - self.window)
            for r, tail in enumerate(input_ids[:, start:].tolist()):
                if self.ended[r] or gen_len > self.row_max[r]:
                    continue
                if tail[-1] in self.stop_ids:
                    self.ended[r] = True
                elif self.stop.find(self.decode(tail)) >= 0:
                    self.stop_at[r], self.ended[r] = gen_len, True
            hit = torch.tensor([s is not None for s in self.stop_at], device=input_ids.device)
            done = done | hit
        return done


class _QueueStreamer(BaseStreamer):
    """Hands each step's tokens (and their logprobs) from the generating thread to the consumer."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.sampler: _Sampler | None = None  # set by the engine before generating
        self._prompt_seen = False
        self._step = 0

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first pushes the prompt
            self._prompt_seen = True
            return
        record = None
        if self.sampler is not None and self._step < len(self.sampler.records):
            record = self.sampler.records[self._step]
        self._step += 1
        self.queue.put((value.reshape(-1).tolist(), record))

    def end(self) -> None:
        pass  # the engine signals the end itself, after generate() has returned (or failed)


_END = object()


class HfEngine(InferEngine):
    """Generate with transformers on CPU, CUDA or MPS.

    ``model`` is a hub id, folder or ``builtin:NAME`` (or pass a loaded ``model_obj`` and ``tokenizer``);
    ``ckpt_dir`` a training checkpoint (adapter or full; its args.json supplies model, template, system);
    ``adapters`` LoRA folders (``["dir", "name=dir"]`` or ``{name: dir}``) that requests pick by name;
    ``template`` a template name or a Template object. Safe to call from several threads (one
    batch generates at a time).
    """

    def __init__(self, model: str | None = None, *, model_obj: Any = None, tokenizer: Any = None,
                 adapters: Sequence[str] | Mapping[str, str] = (), template: Any = None, system: str | None = None,
                 torch_dtype: str | None = "auto", device: str | None = None, device_map: str | dict | None = None,
                 max_batch_size: int = 16, max_model_len: int | None = None, ckpt_dir: str | None = None,
                 hub: str = "hf", revision: str | None = None, attn_impl: str | None = None,
                 model_kwargs: dict | None = None, trust_remote_code: bool = False,
                 enable_thinking: bool | None = None, model_name: str | None = None,
                 agent_template: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                 video_fps: float | None = None, video_max_frames: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if model_obj is not None:
            if tokenizer is None:
                raise ValueError("HfEngine(model_obj=...) needs the tokenizer too")
            if ckpt_dir:
                raise ValueError("pass either model_obj or ckpt_dir, not both")
            model = (model or getattr(model_obj.config, "lmforge_model", None) or model_obj.config.name_or_path
                     or model_name or "model")
        src = resolve_model_source(model, ckpt_dir=ckpt_dir, adapters=adapters,
                                   template=template if isinstance(template, str) else None, system=system)
        if model_obj is None:
            from lmforge.model import get_model_tokenizer

            model_obj, loaded_tok = get_model_tokenizer(
                src.model, hub=hub, revision=revision, torch_dtype=torch_dtype, attn_impl=attn_impl,
                device_map=device_map, model_kwargs=model_kwargs, trust_remote_code=trust_remote_code, device=device)
            tokenizer = tokenizer or loaded_tok
        self.tokenizer = tokenizer
        self.adapters = dict(src.adapters)
        # An engine built from an adapter checkpoint answers with that adapter unless a request names another.
        self.default_adapter = src.default_adapter
        self.model = attach_adapters(model_obj, self.adapters)
        self.model.eval()
        self.device = getattr(self.model, "device", None) or next(self.model.parameters()).device
        self.model_name = model_name or (Path(src.model).name if Path(src.model).exists() else src.model)
        self.max_batch_size = max_batch_size
        self.processor = self._processor(src, hub, revision, min_pixels, max_pixels, trust_remote_code,
                                         video_fps, video_max_frames)
        self.template = self._make_template(template, src, enable_thinking, agent_template)
        self.max_model_len = max_model_len or self._default_max_model_len()
        self.stop_token_ids = self._stop_ids()
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.stop_token_ids[0]  # masked out anyway
        # Stop words that contain a stop token end generation by id already (cheaper than matching
        # text every step); the rest are matched as stop strings.
        self.stop_words = [w for w in getattr(self.template, "stop_words", None) or []
                           if w and not set(tokenizer.encode(w, add_special_tokens=False)) & set(self.stop_token_ids)]
        self._lock = threading.Lock()
        self._token_piece = TokenPieces(tokenizer)
        self.template.token_bytes()  # checked and built now, not in a first stream's chunk
        logger.info("hf engine: %s on %s, max_model_len %d%s", self.model_name, self.device, self.max_model_len,
                    f", adapters {', '.join(self.adapters)}" if self.adapters else "")

    # ---- set-up -------------------------------------------------------------------------------

    def _make_template(self, template: Any, src: Any, enable_thinking: bool | None, agent_template: str | None) -> Any:
        if template is None or isinstance(template, str):
            from lmforge.template import get_template

            tpl = get_template(self.tokenizer, src.template, system=src.system, max_length=None,
                               enable_thinking=enable_thinking if enable_thinking is not None else src.enable_thinking,
                               agent_template=agent_template or getattr(src, "agent_template", None),
                               processor=self.processor)
        else:
            tpl = copy.copy(template)  # a caller's template (a trainer's, say) keeps its own mode
            if src.system is not None:
                tpl.system = src.system
        tpl.set_mode("infer")
        return tpl

    def _processor(self, src: Any, hub: str, revision: str | None, min_pixels: int | None,
                   max_pixels: int | None, trust_remote_code: bool, video_fps: float | None = None,
                   video_max_frames: int | None = None) -> Any:
        """A vision-language model's processor (None for a text model); pixel bounds and video frame sampling
        default to training's."""
        from lmforge.model.vision import family_of, get_processor, is_vision_config

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.vision_family = family_of(base.config)
        if not is_vision_config(base.config):
            return None
        train = src.train_args
        return get_processor(src.model, base.config, self.tokenizer, hub=hub, revision=revision,
                             min_pixels=min_pixels or train.get("min_pixels"),
                             max_pixels=max_pixels or train.get("max_pixels"), trust_remote_code=trust_remote_code,
                             video_fps=video_fps or train.get("video_fps"),
                             video_max_frames=video_max_frames or train.get("video_max_frames"))

    def _vision_inputs(self, jobs: list[_Job], n: int, input_ids: torch.Tensor) -> dict[str, Any]:
        """Pixels (and token types) for a batch whose prompts hold images or videos; each prompt repeated ``n``
        times."""
        images = [ref for j in jobs for _ in range(n) for ref in j.images]
        videos = [v for j in jobs for _ in range(n) for v in j.videos]
        vision = getattr(self.template, "vision", None)
        if not (images or videos) or vision is None:
            return {}
        out = {k: v.to(self.device) for k, v in vision.pixel_inputs(images, videos).items()}
        if self.vision_family is not None and self.vision_family.token_type_ids:
            out["mm_token_type_ids"] = vision.token_type_ids(input_ids)
        return out

    def _stop_ids(self) -> list[int]:
        """The template's stop tokens plus the model's own eos ids (chat models often list several)."""
        ids = list(getattr(self.template, "stop_token_ids", None) or [])
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
        ids.append(self.tokenizer.eos_token_id)
        return [int(i) for i in dict.fromkeys(ids) if i is not None]

    def _default_max_model_len(self) -> int:
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n = getattr(text_config, "max_position_embeddings", None)
        if not n:
            tok_max = getattr(self.tokenizer, "model_max_length", None)
            n = tok_max if tok_max and tok_max < 10_000_000 else 4096
        return int(n)

    # ---- requests -----------------------------------------------------------------------------

    def encode(self, request: InferRequest | dict, *, index: int | None = None) -> list[int]:
        """Prompt token ids for ``request`` (raises :class:`InferRequestError` for bad input).

        A request with a ``prompt`` (text or token ids, as /v1/completions sends) skips the chat
        template: the text is tokenized as it is, with no special tokens added.
        """
        return self._encode(request, index)[0]

    def _encode(self, request: InferRequest | dict, index: int | None) -> tuple[list[int], list[str], list]:
        """Prompt ids and the prompt's image and video references."""
        prompt = getattr(request, "prompt", None)
        if prompt is not None:
            ids = self._encode_prompt(prompt, index)
            return (ids, *self._prompt_media(request, ids, index))
        row = to_canonical_row(request, index=index)
        try:
            encoded = self.template.encode(row)
        except ValueError as e:  # TemplateError / MaxLengthError / MediaError: the message says why
            raise InferRequestError(str(e), index=index) from e
        return ([int(i) for i in encoded["input_ids"]], list(encoded.get("images") or []),
                [list(v) for v in encoded.get("videos") or []])

    def _prompt_media(self, request: Any, ids: list[int], index: int | None) -> tuple[list[str], list[list[str]]]:
        """The images and videos of a raw prompt whose ids already hold their expanded image and video tokens (GRPO
        sends its own encoding of a media row so); their numbers of tokens must match."""
        images = list(getattr(request, "images", None) or [])
        videos = list(getattr(request, "videos", None) or [])
        if not images and not videos:
            return [], []
        vision = getattr(self.template, "vision", None)
        if vision is None:
            raise InferRequestError(f"the prompt has {len(images)} image(s) and {len(videos)} video(s) but "
                                    f"{self.model_name} is not a vision-language model", index=index)
        from lmforge.dataset.media import MediaError, normalize_image, normalize_video

        try:
            images = [normalize_image(ref) for ref in images]
            videos = [normalize_video(v) for v in videos]
            want = [sum(vision.num_tokens(ref) for ref in images), sum(vision.num_video_tokens(v) for v in videos)]
        except (MediaError, ValueError) as e:
            raise InferRequestError(f"prompt images and videos: {e}", index=index) from None
        for what, token, n, k in (("image", vision.image_token_id, len(images), want[0]),
                                  ("video", vision.video_token_id, len(videos), want[1])):
            have = sum(1 for t in ids if t == token) if token is not None else 0
            if have != k:
                raise InferRequestError(f"the prompt holds {have} {what} tokens but its {n} {what}(s) give {k}: "
                                        "encode it with this engine's template and processor", index=index)
        return images, videos

    def _encode_prompt(self, prompt: str | list[int], index: int | None) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        else:
            # map/min/max loop in C: half the time of a per-id Python check (256 prompts of 2,048 ids: 33 vs 63 ms)
            ids, vocab = list(map(int, prompt)), self.vocab_size
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                bad = [t for t in ids if not 0 <= t < vocab]
                raise InferRequestError(f"prompt holds token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}",
                                        index=index)
        if not ids:
            raise InferRequestError("the prompt is empty", index=index)
        return ids

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: a raw prompt's token ids must be below it."""
        return self.model.get_input_embeddings().num_embeddings

    counts_locally = True  # the tokenizer is in this process

    def count_prompt_tokens(self, request: InferRequest) -> int:
        return len(self.encode(request))

    def _prepare(self, index: int | None, request: InferRequest | dict, cfg: RequestConfig,
                 ids: list[int] | None = None) -> _Job:
        """The request's job; ``ids`` are its prompt ids when the caller encoded them already (the server's
        front encodes a text model's prompts as it counts them, so the engine process does not again)."""
        request = parse_request(request, index=index)
        if request.adapter and request.adapter not in self.adapters:  # None: the default; "": the base
            known = ", ".join(self.adapters) or "none were loaded (pass --adapters)"
            raise InferRequestError(f"unknown adapter {request.adapter!r}; known adapters: {known}", index=index)
        ids, images, videos = (list(ids), [], []) if ids is not None else self._encode(request, index)
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(len(ids), self.max_model_len, index=index)
        room = self.max_model_len - len(ids)
        return _Job(index, request, ids, min(cfg.max_tokens or room, room), images, videos)

    # ---- generation ---------------------------------------------------------------------------

    @contextmanager
    def _adapter(self, name: str | None) -> Iterator[None]:
        name = name if name is not None else self.default_adapter
        if not self.adapters:
            yield
        elif not name:  # "" asks for the base model explicitly
            with self.model.disable_adapter():
                yield
        else:
            try:
                self.model.set_adapter(name, inference_mode=True)  # keep its weights frozen
            except TypeError:  # peft before 0.18 has no inference_mode (and does not unfreeze)
                self.model.set_adapter(name)
            yield

    def _generation_config(self, max_new_tokens: int, eos_ids: list[int] | None = None) -> GenerationConfig:
        # Neutral values are set explicitly: unset ones would be filled from the model's
        # generation_config.json (a checkpoint's repetition_penalty, say) behind the request's back.
        return GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, num_return_sequences=1,
            temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
            eos_token_id=self.stop_token_ids if eos_ids is None else eos_ids, pad_token_id=self.pad_token_id,
            use_cache=True)

    def _decode(self, ids: list[int]) -> str:
        return self.template.decode(ids)

    def _generate(self, jobs: list[_Job], cfg: RequestConfig, *, streamer: _QueueStreamer | None = None,
                  cancel: threading.Event | None = None) -> list[list[_Row]]:
        """Generate ``cfg.n`` sequences for each job (all on one adapter); one list of rows per job."""
        n = cfg.n
        prompts = [j.input_ids for j in jobs for _ in range(n)]
        prompt_len = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_token_id] * (prompt_len - len(p)) + p for p in prompts],
                                 device=self.device)
        pad_lens = torch.tensor([prompt_len - len(p) for p in prompts], device=self.device)
        attention_mask = (torch.arange(prompt_len, device=self.device)[None, :] >= pad_lens[:, None]).long()
        row_max = [j.max_tokens for j in jobs for _ in range(n)]
        stop = StopStrings([*cfg.stop, *self.stop_words])
        vision = getattr(self.template, "vision", None)
        sampler = _Sampler(cfg, [j.request.seed if j.request.seed is not None else cfg.seed for j in jobs],
                           prompt_len, pad_lens, self.device, banned=vision.token_ids if vision is not None else ())
        eos_ids = [] if cfg.ignore_eos else self.stop_token_ids
        criteria = _StopCriteria(prompt_len, row_max, self.device, stop, set(eos_ids), self._decode, cancel)
        if streamer is not None:
            streamer.sampler = sampler
        vision = self._vision_inputs(jobs, n, input_ids)
        with self._lock, self._adapter(jobs[0].request.adapter), torch.inference_mode():
            sequences = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **vision,
                generation_config=self._generation_config(max(row_max), eos_ids),
                logits_processor=LogitsProcessorList([sampler]), stopping_criteria=StoppingCriteriaList([criteria]),
                streamer=streamer)
        generated = sequences[:, prompt_len:].tolist()
        logprobs = self._logprob_table(sampler)
        rows = [self._finish_row(r, generated[r], row_max[r], criteria, stop, logprobs, eos_ids)
                for r in range(len(prompts))]
        return [rows[j * n:(j + 1) * n] for j in range(len(jobs))]

    def _finish_row(self, r: int, gen: list[int], row_max: int, criteria: _StopCriteria, stop: StopStrings,
                    logprobs: Callable[[int, int], list[TokenLogprob]] | None,
                    eos_ids: list[int] | None = None) -> _Row:
        """Where sequence ``r`` really ended, and why (generate pads sequences that finished early)."""
        stop_at = criteria.stop_at[r]
        limit = min(len(gen), row_max, stop_at if stop_at is not None else row_max)
        eos_ids = self.stop_token_ids if eos_ids is None else eos_ids  # [] with ignore_eos
        eos = next((k for k, t in enumerate(gen[:limit]) if t in eos_ids), None)
        text_end = None
        if eos is not None:
            ids, reason, text_end = gen[:eos + 1], "stop", eos  # the stop token is counted, not shown
        elif stop_at is not None:
            ids, reason = gen[:stop_at], "stop"
        elif limit >= row_max:
            ids, reason = gen[:row_max], "length"
        else:
            ids, reason = gen[:limit], "abort" if criteria.cancelled else "length"
        text, hit = stop.cut(self._decode(ids[:text_end]))
        if hit:
            reason = "stop"
        return _Row(ids, text, reason, logprobs(r, len(ids)) if logprobs is not None else None)

    def _logprob_entries(self, tokens: list[int], chosen: list[float], top_ids: list[list[int]] | None,
                         top_lps: list[list[float]] | None) -> list[TokenLogprob]:
        out = []
        for k, (tok, lp) in enumerate(zip(tokens, chosen)):
            text, raw = self._token_piece(tok)
            top = []
            if top_ids is not None:
                top = [TopLogprob(token=piece[0], logprob=v, bytes=piece[1])
                       for i, v in zip(top_ids[k], top_lps[k]) for piece in [self._token_piece(i)]]
            out.append(TokenLogprob(token=text, logprob=lp, bytes=raw, top_logprobs=top))
        return out

    def _step_logprobs(self, record: tuple[torch.Tensor, ...]) -> list[TokenLogprob]:
        """One step's logprob entries, one per sequence of the batch (for streaming)."""
        return self._logprob_entries(*(t.tolist() if t is not None else None for t in record))

    def _logprob_table(self, sampler: _Sampler) -> Callable[[int, int], list[TokenLogprob]] | None:
        """``table(row, length)``: the first ``length`` logprob entries of a row (host copies made once)."""
        if sampler.top_k_logprobs < 0 or not sampler.records:
            return None if sampler.top_k_logprobs < 0 else (lambda r, length: [])
        fields = [torch.stack([rec[i] for rec in sampler.records], dim=1).tolist()
                  if sampler.records[0][i] is not None else None for i in range(4)]

        def table(r: int, length: int) -> list[TokenLogprob]:
            tokens, chosen, top_ids, top_lps = (f[r][:length] if f is not None else None for f in fields)
            return self._logprob_entries(tokens, chosen, top_ids, top_lps)

        return table

    # ---- responses ----------------------------------------------------------------------------

    def _parse_tool_calls(self, text: str) -> tuple[str | None, list[ToolCall] | None]:
        """Tool calls in a reply, through the template's agent template when it has one.

        Hook for agent templates: ``template.agent_template.parse_tool_calls(text)`` returns
        ``(content_without_calls, [{"name": str, "arguments": dict | str}, ...])``.
        """
        agent = getattr(self.template, "agent_template", None)
        parse = getattr(agent, "parse_tool_calls", None)
        if parse is None:
            return text, None
        content, calls = parse(text)
        if not calls:
            return text, None
        import json

        return content or None, [ToolCall(function=Function(
            name=c["name"], arguments=c["arguments"] if isinstance(c["arguments"], str)
            else json.dumps(c["arguments"], ensure_ascii=False))) for c in calls]

    def _choice_message(self, row: _Row, tools: bool = True) -> tuple[ChatMessage, str]:
        """The reply as a message; tool calls are parsed out of it only when the request offered tools."""
        content, tool_calls = self._parse_tool_calls(row.text) if tools else (row.text, None)
        reason = "tool_calls" if tool_calls and row.finish_reason == "stop" else row.finish_reason
        return ChatMessage(role="assistant", content=content, tool_calls=tool_calls), reason

    def _response(self, job: _Job, rows: list[_Row]) -> ChatCompletionResponse:
        choices = []
        for k, row in enumerate(rows):
            message, reason = self._choice_message(row, bool(job.request.tools))
            choices.append(Choice(index=k, message=message, finish_reason=reason, token_ids=row.token_ids,
                                  logprobs=ChoiceLogprobs(content=row.logprobs) if row.logprobs is not None else None))
        completion = sum(len(r.token_ids) for r in rows)
        usage = Usage(prompt_tokens=len(job.input_ids), completion_tokens=completion,
                      total_tokens=len(job.input_ids) + completion)
        return ChatCompletionResponse(model=job.request.adapter or self.model_name, choices=choices, usage=usage)

    # ---- weights ------------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Copy tensors into the model's parameters by name (between generations, under the engine's lock).

        A name of the plain model finds its LoRA-wrapped parameter too (``q_proj.weight`` ->
        ``q_proj.base_layer.weight``). A tensor that already is the parameter (an engine built on
        the training model itself, ``model_obj=``) is skipped, so then this is a no-op.
        """
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        params = dict(base.named_parameters(remove_duplicate=False))
        unknown: list[str] = []
        with self._lock, torch.no_grad():
            for name, tensor in named_tensors:
                p = params.get(name)
                if p is None:
                    owner, _, leaf = name.rpartition(".")
                    p = params.get(f"{owner}.base_layer.{leaf}")
                if p is None:
                    unknown.append(name)
                    continue
                if p.data_ptr() == tensor.data_ptr() and p.device == tensor.device:
                    continue
                if p.shape != tensor.shape:
                    raise ValueError(f"update_weights: {name} has shape {tuple(tensor.shape)}, the model's is "
                                     f"{tuple(p.shape)}")
                p.copy_(tensor.to(device=p.device, dtype=p.dtype))
        if unknown:
            raise KeyError(f"update_weights: {len(unknown)} names are not parameters of {self.model_name}, "
                           f"e.g. {unknown[:3]}")

    # ---- the engine interface -----------------------------------------------------------------

    def infer(self, requests: list[InferRequest], request_config: RequestConfig | None = None, *,
              use_tqdm: bool | None = None) -> list[ChatCompletionResponse]:
        """Every request is checked before any is generated: a bad one raises
        :class:`InferRequestError` naming its index, and nothing is generated."""
        cfg = request_config or RequestConfig()
        jobs = [self._prepare(i, r, cfg) for i, r in enumerate(requests)]
        groups: dict[str | None, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.request.adapter, []).append(job)
        per_batch = max(1, self.max_batch_size // cfg.n)
        show = use_tqdm if use_tqdm is not None else len(jobs) > per_batch
        from tqdm.auto import tqdm

        results: list[ChatCompletionResponse | None] = [None] * len(jobs)
        with tqdm(total=len(jobs), desc="Generating", unit="req", disable=not show, dynamic_ncols=True) as bar:
            for group in groups.values():
                group.sort(key=lambda j: len(j.input_ids), reverse=True)  # similar lengths pad little
                for start in range(0, len(group), per_batch):
                    batch = group[start:start + per_batch]
                    for job, rows in zip(batch, self._generate(batch, cfg)):
                        results[job.index] = self._response(job, rows)
                    bar.update(len(batch))
        return results  # type: ignore[return-value]

    def infer_stream(self, request: InferRequest, request_config: RequestConfig | None = None
                     ) -> Iterator[ChatCompletionStreamResponse]:
        """Chunks as tokens arrive; closing the iterator (or Ctrl-C) stops generation within a step.

        The pieces add up to the non-streaming reply: each is cut from the decoded reply so far,
        holding back an incomplete character or a possible stop string until it is settled.
        """
        cfg = request_config or RequestConfig()
        job = self._prepare(None, request, cfg)
        return self._stream(job, cfg)

    def _stream(self, job: _Job, cfg: RequestConfig) -> Iterator[ChatCompletionStreamResponse]:
        streamer, cancel, outcome = _QueueStreamer(), threading.Event(), {}

        def run() -> None:
            try:
                outcome["rows"] = self._generate([job], cfg, streamer=streamer, cancel=cancel)[0]
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                outcome["error"] = e
            finally:
                streamer.queue.put(_END)

        reply = ReplyStream(self, job, cfg)
        thread = threading.Thread(target=run, name="lmforge-generate", daemon=True)
        thread.start()
        try:
            yield reply.first()
            while (item := streamer.queue.get()) is not _END:
                tokens, record = item
                entries = self._step_logprobs(record) if (cfg.logprobs and record is not None) else None
                out = reply.steps([(tokens, entries)])
                if out is not None:
                    yield out
            thread.join()
            if "error" in outcome:
                raise outcome["error"]
            yield reply.final(outcome["rows"])
        finally:
            cancel.set()
            thread.join()
