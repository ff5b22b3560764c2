"""The Template: turns a canonical row into token ids, labels and loss weights.

One class serves every model. Its prompt format is a jinja chat template: the tokenizer's own
(``name="auto"``) or a registered one (``registered.py``). Rendering goes through transformers'
``apply_chat_template``, so the token ids always equal what the model sees at inference, and the
labels come from locating each trained message in that rendering (``jinja.SpanLocator``).

Modes: ``train`` (input_ids, labels, loss_scale), ``infer`` (prompt ending with the generation
prompt), ``rlhf`` (chosen and rejected encodings), ``pt`` (raw text, all tokens trained).
Labels are aligned with input_ids (not shifted); -100 means "no loss".
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from .jinja import SpanLocator, probe_assistant_header, probe_end_of_turn, render_chat, warn_once
from .loss_scale import LossScale, get_loss_scale

IGNORE_INDEX = -100
MODES = ("train", "infer", "rlhf", "pt")
TRUNCATION_STRATEGIES = ("left", "right", "delete", "raise")
ROLES = ("system", "user", "assistant", "tool_call", "tool_response")
# Bump when the encoding of the same inputs changes, so cached datasets are rebuilt.
ENCODING_VERSION = 2

# Which canonical role may follow which ("start" = beginning, after an optional system prompt).
_FOLLOWS = {
    "start": ("user",),
    "user": ("assistant", "tool_call"),
    "assistant": ("user", "tool_call"),
    "tool_call": ("tool_call", "tool_response"),
    "tool_response": ("tool_response", "assistant", "tool_call"),
}


class TemplateError(ValueError):
    """A row the template cannot encode; the message names the row's problem."""


class MaxLengthError(TemplateError):
    """The encoded row is longer than ``max_length`` and ``truncation_strategy`` is ``raise``."""


@dataclass
class Turn:
    """One message in chat-template form, and what the template needs to know about it."""

    message: dict  # what the jinja template sees: role user/assistant/system/tool, content, tool_calls
    loss: bool | None = None  # per-message override from the row
    sources: list[int] = field(default_factory=list)  # indices in the row's messages

    @property
    def role(self) -> str:
        return self.message["role"]


def _content(msg: dict, i: int) -> str:
    content = msg.get("content")
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts: only text is supported here
        if all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            return "".join(p.get("text", "") for p in content)
        raise TemplateError(f"messages[{i}] has non-text content parts; only text is supported")
    if not isinstance(content, str):
        raise TemplateError(f"messages[{i}] content must be a string, got {type(content).__name__}")
    return content


def _tool_call(content: Any, i: int) -> dict:
    """A ``tool_call`` message's JSON ``{"name", "arguments"}`` as an OpenAI tool call."""
    call = content
    if isinstance(content, str):
        try:
            call = json.loads(content)
        except json.JSONDecodeError as e:
            raise TemplateError(f"messages[{i}] (tool_call) content is not valid JSON: {e}") from None
    outer = call if isinstance(call, dict) and isinstance(call.get("function"), dict) else {}
    call = outer.get("function", call)
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise TemplateError(f"messages[{i}] (tool_call) content must be a JSON object with a 'name', got {content!r}")
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):  # a JSON object in a string becomes a dict, as chat templates expect
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError:
            parsed = None
        args = parsed if isinstance(parsed, dict) else args  # else verbatim: templates print strings as-is
    # Keep an OpenAI call's other fields (its id): some templates print them.
    return {**outer, "type": "function", "function": {"name": call["name"], "arguments": args}}


def parse_tools(tools: Any) -> list[dict] | None:
    """The row's ``tools``: None, a list of OpenAI tool schemas, or that list as a JSON string."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise TemplateError(f"tools is not valid JSON: {e}") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise TemplateError(f"tools must be a list of tool schemas (dicts), got {type(tools).__name__}")
    return tools or None


def to_turns(messages: Any, system: str | None = None) -> list[Turn]:
    """Validate canonical messages and convert them to chat-template form.

    Consecutive ``tool_call`` messages become one assistant turn with ``tool_calls`` (an assistant
    text message right before them becomes its content); ``tool_response`` becomes role ``tool``.
    OpenAI-style input (role ``tool``, assistant ``tool_calls``) is accepted as well, so requests to
    the server need no conversion. ``system`` replaces or inserts the system prompt.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TemplateError("empty messages: a row needs a non-empty 'messages' list")
    turns: list[Turn] = []
    prev = "start"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise TemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {msg!r:.80}")
        role = msg["role"]
        if role == "tool":
            role = "tool_response"
        if role not in ROLES:
            raise TemplateError(f"messages[{i}] has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        loss = msg.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise TemplateError(f"messages[{i}] 'loss' must be true, false or null, got {loss!r}")
        if role == "system":
            if i != 0:
                raise TemplateError(f"messages[{i}] is a system message; a system message may only come first")
        elif role not in _FOLLOWS[prev]:
            after = "the start of the conversation" if prev == "start" else f"messages[{i - 1}] ({prev})"
            raise TemplateError(f"messages must alternate between user and assistant: messages[{i}] ({role}) "
                                f"cannot follow {after}")
        content = msg.get("content") if role == "tool_call" else _content(msg, i)
        extra = {k: v for k, v in msg.items() if k not in ("role", "content", "loss")}
        if role == "tool_call":
            call = _tool_call(content, i)
            if turns and turns[-1].role == "assistant" and prev in ("assistant", "tool_call"):
                turn = turns[-1]
                turn.message["tool_calls"] = list(turn.message.get("tool_calls") or []) + [call]
                turn.loss = _merge_loss(turn.loss, loss)
                turn.sources.append(i)
            else:
                turns.append(Turn({"role": "assistant", "content": "", "tool_calls": [call]}, loss, [i]))
        elif role == "tool_response":
            turns.append(Turn({**extra, "role": "tool", "content": content}, loss, [i]))
        else:
            if role == "assistant" and extra.get("tool_calls"):  # OpenAI style: same form as tool_call rows
                extra["tool_calls"] = [_tool_call(c, i) for c in extra["tool_calls"]]
            turns.append(Turn({**extra, "role": role, "content": content}, loss, [i]))
        # An OpenAI assistant message that carries calls is followed like a tool_call.
        prev = "start" if role == "system" else "tool_call" if role == "assistant" and msg.get("tool_calls") else role
    if system is not None:
        if turns[0].role == "system":
            turns[0].message["content"] = system
        else:
            turns.insert(0, Turn({"role": "system", "content": system}))
    return turns


def _merge_loss(a: bool | None, b: bool | None) -> bool | None:
    """One assistant turn made of several messages: trained if any asks for it."""
    if a is None or b is None:
        return b if a is None else a
    return a or b


class Template:
    """Encodes canonical rows for one tokenizer and prompt format. See the module docstring."""

    def __init__(self, tokenizer: Any, *, name: str = "auto", chat_template: str | None = None,
                 system: str | None = None, max_length: int | None = None, truncation_strategy: str = "right",
                 loss_scale: str | LossScale = "default", enable_thinking: bool | None = None,
                 stop_words: Sequence[str] = (), template_kwargs: dict | None = None, agent_template: Any = None,
                 processor: Any = None):
        if truncation_strategy not in TRUNCATION_STRATEGIES:
            raise ValueError(f"truncation_strategy must be one of {', '.join(TRUNCATION_STRATEGIES)}, "
                             f"got {truncation_strategy!r}")
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                                "pass a registered template name (e.g. template='default')")
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.tokenizer = tokenizer
        self.name = name
        self.chat_template = chat_template  # None: the tokenizer's own
        self.system = system
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.loss_scale: LossScale = get_loss_scale(loss_scale)
        self.enable_thinking = enable_thinking
        self.template_kwargs = dict(template_kwargs or {})
        if enable_thinking is not None:
            self.template_kwargs["enable_thinking"] = enable_thinking
        self.mode = "train"
        self.end_of_turn = probe_end_of_turn(lambda m: self._render(m))
        self.assistant_header = probe_assistant_header(lambda m: self._render(m))
        eos = getattr(tokenizer, "eos_token", None)
        self.stop_words: list[str] = list(dict.fromkeys(w for w in (self.end_of_turn, *stop_words, eos) if w))
        self.stop_token_ids: list[int] = self._stop_token_ids()
        self.agent_template, self.agent_render = self._resolve_agent(agent_template)
        # A vision-language processor: <image> tags render through it (template/vision.py).
        self.vision = None
        if processor is not None and getattr(processor, "image_processor", None) is not None:
            from .vision import VisionEncoder

            self.vision = VisionEncoder(processor, TemplateError)
            self.vision.check_renders(lambda m: self._render(m))

    # ----------------------------------------------------------------------------- public API

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown template mode {mode!r}; expected one of {', '.join(MODES)}")
        self.mode = mode

    def render(self, messages: list[dict], tools: Any = None, add_generation_prompt: bool = False) -> str:
        """The prompt text for canonical messages (system override applied), as the model sees it."""
        turns, tools = self._turns(messages, tools)
        return self._render([t.message for t in turns], tools, add_generation_prompt)

    def encode(self, row: dict) -> dict | None:
        """Encode one row for the current mode; None only when too long and truncation is ``delete``."""
        if not isinstance(row, dict):
            raise TemplateError(f"a row must be a dict, got {type(row).__name__}")
        if self.mode == "pt":
            return self._encode_pt(row)
        if self.mode == "infer":
            return self._encode_infer(row)
        if self.mode == "rlhf":
            return self._encode_rlhf(row)
        enc = self._encode_train(row.get("messages"), row.get("tools"), media=self._media(row))
        return self._finish(enc)

    def decode(self, generated_ids: Sequence[int]) -> str:
        """Reply text of generated ids: cut at the first stop token, trailing padding and stop words removed.

        A streamed reply calls this twice per chunk, so the per-call work outside the tokenizer is kept small:
        a list of ints is not copied, and the pad id is looked up again only when the tokenizer's pad token
        changes (transformers' attribute lookup for it cost more than the decode itself)."""
        ids = generated_ids if type(generated_ids) is list and (not generated_ids or type(generated_ids[0]) is int) \
            else _as_list(generated_ids)
        stops = self._stop_set
        for k, t in enumerate(ids):
            if t in stops:
                ids = ids[:k]
                break
        pad = self._pad_id()
        end = len(ids)
        while end and ids[end - 1] == pad:
            end -= 1
        if end < len(ids):
            ids = ids[:end]
        backend = self.__dict__.get("_raw_backend", _UNSET)
        if backend is _UNSET:
            backend = self._raw_backend = raw_decoder(self.tokenizer)
        text = (backend.decode(ids, skip_special_tokens=False) if backend is not None
                else self.tokenizer.decode(ids, skip_special_tokens=False))
        return self.strip_stop_words(text)

    def strip_stop_words(self, text: str) -> str:
        """``text`` without the stop words at its end (the last step of :meth:`decode`)."""
        stripped = True
        while stripped:
            stripped = False
            for w in self.stop_words:
                if text.endswith(w):
                    text, stripped = text[: -len(w)], True
        return text

    def token_bytes(self) -> Any:
        """Each token's bytes (a :class:`~lmforge.template.token_bytes.TokenBytes`) where the tokenizer's decode
        is the UTF-8 of its tokens' joined bytes, else None; built once. ``decode`` of ids that hold no stop or
        pad token is then ``strip_stop_words`` of that UTF-8: streams decode token by token with it."""
        table = self.__dict__.get("_token_bytes", _UNSET)
        if table is _UNSET:
            from .token_bytes import TokenBytes

            table = self._token_bytes = TokenBytes.for_tokenizer(self.tokenizer)
        return table

    def decode_cut_ids(self) -> set[int]:
        """The ids :meth:`decode` cuts at or strips (stop tokens, the pad token)."""
        return {*self._stop_set, self._pad_id()} - {None}

    @property
    def _stop_set(self) -> frozenset:
        ids, cached = self.stop_token_ids, self.__dict__.get("_stop_cache")
        if cached is None or cached[0] is not ids or cached[1] != len(ids):  # reassigned or appended to
            cached = self._stop_cache = (ids, len(ids), frozenset(ids))
        return cached[2]

    def _pad_id(self) -> int | None:
        """The tokenizer's pad id, cached against its pad token (transformers 5 keeps it in _special_tokens_map)."""
        tok = self.tokenizer
        token = getattr(tok, "__dict__", {}).get("_special_tokens_map", {}).get("pad_token", _UNSET)
        cached = self.__dict__.get("_pad_cache")
        if token is not _UNSET and cached is not None and cached[0] is token:
            return cached[1]
        pad = getattr(tok, "pad_token_id", None)
        if token is not _UNSET:
            self._pad_cache = (token, pad)
        return pad

    def safe_decode(self, ids: Sequence[int]) -> str:
        """Text of ids that may hold -100 or out-of-range values (shown as ``[-100 * 7]``), for logging samples."""
        ids, vocab = _as_list(ids), len(self.tokenizer)
        out, run = [], []
        k = 0
        while k < len(ids):
            if 0 <= ids[k] < vocab:
                run.append(ids[k])
                k += 1
                continue
            if run:
                out.append(self.tokenizer.decode(run, skip_special_tokens=False))
                run = []
            j = k
            while j < len(ids) and ids[j] == ids[k]:
                j += 1
            out.append(f"[{ids[k]} * {j - k}]")
            k = j
        if run:
            out.append(self.tokenizer.decode(run, skip_special_tokens=False))
        return "".join(out)

    def cache_key(self) -> str:
        """Hash of everything that changes the encoding, for caching encoded datasets."""
        tok = self.tokenizer
        template_text = self.chat_template if self.chat_template is not None else getattr(tok, "chat_template", "")
        payload = {
            "version": ENCODING_VERSION,
            "tokenizer": str(getattr(tok, "name_or_path", "")),
            "vocab_size": len(tok),
            "template": self.name,
            "chat_template": hashlib.sha256(str(template_text).encode()).hexdigest(),
            "system": self.system,
            "max_length": self.max_length,
            "truncation_strategy": self.truncation_strategy,
            "loss_scale": self.loss_scale.cache_key(),
            "mode": self.mode,
            "template_kwargs": self.template_kwargs,
            "agent_template": [getattr(self.agent_template, "name", None), self.agent_render],
        }
        if self.vision is not None:
            payload["vision"] = self.vision.cache_key()
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"Template(name={self.name!r}, mode={self.mode!r}, max_length={self.max_length}, "
                f"loss_scale={self.loss_scale.name!r}, stop_words={self.stop_words!r})")

    # ----------------------------------------------------------------------------- agent (tools)

    def _resolve_agent(self, agent_template: Any) -> tuple[Any, bool]:
        """``(agent template, render through it?)``; see ``lmforge/template/agent.py``.

        A named agent template renders tools, calls and results into plain messages. With none named,
        a chat template that renders tools itself keeps doing so and the agent template matching its
        style parses replies; one that does not gets ``hermes`` for both.
        """
        from .agent import detect_agent_template, get_agent_template

        if agent_template not in (None, "", "auto"):
            return get_agent_template(agent_template), True
        native, style = detect_agent_template(lambda m, tools: self._render(m, tools))
        if not native:
            return get_agent_template("hermes"), True
        if style is None:
            warn_once(f"template {self.name!r} renders tools in a style no agent template recognises; tool calls "
                      "in replies are not parsed (pass --agent_template to pick one)")
            return None, False
        return get_agent_template(style), False

    def _turns(self, messages: Any, tools: Any) -> tuple[list[Turn], list[dict] | None]:
        """Validated turns and tools for the chat template, rewritten by the agent template if it renders."""
        turns, tools = to_turns(messages, self.system), parse_tools(tools)
        if not self.agent_render or self.agent_template is None:
            return turns, tools
        agent, out = self.agent_template, []
        for turn in turns:
            msg = turn.message
            if turn.role == "assistant" and msg.get("tool_calls"):
                text = agent.format_tool_calls(msg["tool_calls"], msg.get("content") or None)
                rest = {k: v for k, v in msg.items() if k not in ("tool_calls", "content")}
                out.append(Turn({**rest, "content": text}, turn.loss, list(turn.sources)))
            elif turn.role == "tool":
                if out and out[-1].message.get("_tool_results") is not None:  # results of one round: one message
                    prev = out[-1]
                    prev.message["_tool_results"].append(msg.get("content") or "")
                    prev.loss = _merge_loss(prev.loss, turn.loss)
                    prev.sources += turn.sources
                else:
                    out.append(Turn({"role": agent.response_role, "_tool_results": [msg.get("content") or ""]},
                                    turn.loss, list(turn.sources)))
            else:
                out.append(turn)
        for turn in out:
            results = turn.message.pop("_tool_results", None)
            if results is not None:
                turn.message["content"] = agent.format_tool_responses(results)
        if tools:
            if out[0].role == "system":
                out[0] = Turn({**out[0].message, "content": agent.format_tools(tools, out[0].message["content"])},
                              out[0].loss, out[0].sources)
            else:
                out.insert(0, Turn({"role": "system", "content": agent.format_tools(tools)}))
        return out, None

    # ----------------------------------------------------------------------------- encoding

    def _render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
                continue_final_message: bool = False) -> str:
        return render_chat(self.tokenizer, messages, chat_template=self.chat_template, tools=tools,
                           add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, template_kwargs=self.template_kwargs)

    def _render_checked(self, messages: list[dict], tools: list[dict] | None, **kw: Any) -> str:
        try:
            return self._render(messages, tools, **kw)
        except TemplateError:
            raise
        except Exception as e:  # jinja raise_exception(...) and friends: the template rejects the row
            raise TemplateError(f"chat template {self.name!r} failed to render the row: {e}") from e

    def _tokenize(self, text: str, char_weights: list[float] | None = None) -> tuple[list[int], list[float]]:
        """Token ids of ``text`` (as apply_chat_template tokenizes it) and each token's weight.

        A token takes the weight of its first non-whitespace character (its first character when
        it is all whitespace): a word merged with the space before it (" answer") belongs where
        the word is, so a reply's first word is trained even when its space ends the prompt.
        """
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # a Python tokenizer without offsets: tokenize piece by piece
            return self._tokenize_pieces(text, char_weights)
        ids = list(enc["input_ids"])
        if char_weights is None:
            return ids, [1.0] * len(ids)
        n = len(char_weights)
        weights = []
        for s, e in enc["offset_mapping"]:
            k = s
            while k < e and text[k].isspace():
                k += 1
            k = s if k == e else k
            weights.append(char_weights[k] if k < n else 0.0)
        return ids, weights

    def _tokenize_pieces(self, text: str, char_weights: list[float] | None) -> tuple[list[int], list[float]]:
        warn_once(f"tokenizer {type(self.tokenizer).__name__} gives no offsets; tokenizing trained and untrained "
                  "pieces separately, so ids may differ slightly from apply_chat_template's")
        if char_weights is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return list(ids), [1.0] * len(ids)
        ids, weights, k = [], [], 0
        while k < len(text):
            j = k
            while j < len(text) and char_weights[j] == char_weights[k]:
                j += 1
            piece = self.tokenizer(text[k:j], add_special_tokens=False)["input_ids"]
            ids += piece
            weights += [char_weights[k]] * len(piece)
            k = j
        return ids, weights

    def _media(self, row: dict) -> tuple[list[str], list] | None:
        """The row's images and videos when the template has a processor (None otherwise; a row with
        images for a text model is an error rather than silently text-only)."""
        images, videos = list(row.get("images") or []), list(row.get("videos") or [])
        if self.vision is None:
            if images or videos:
                raise TemplateError(f"the row has {len(images)} image(s) and {len(videos)} video(s) but "
                                    f"{getattr(self.tokenizer, 'name_or_path', 'the model')!r} has no image processor "
                                    "(not a vision-language model)")
            return None
        return images, videos

    def _encode_train(self, messages: Any, tools: Any, *, require_reply: bool = True, media: Any = None) -> dict:
        turns, tools = self._turns(messages, tools)
        if require_reply and turns[-1].role != "assistant":
            raise TemplateError(f"{self.mode} rows must end with an assistant message (the reply to learn); "
                                f"the last message is {turns[-1].role!r}")
        msgs = [t.message for t in turns]
        if media is not None:
            msgs = self.vision.to_parts(msgs, *media)
        full = self._render_checked(msgs, tools)
        weights = self._message_weights(turns)
        scale = self.loss_scale
        background = 1.0 if scale.all_tokens else 0.0
        char_w = [background] * len(full)
        locator = SpanLocator(lambda m, gen: self._render(m, tools, gen), msgs, full, self.end_of_turn, self.name,
                              self.assistant_header)
        for k, (turn, w) in enumerate(zip(turns, weights)):
            rules = w > 0 and turn.role == "assistant" and scale.has_span_rules
            if w == background and not rules:
                continue
            span = locator.locate(k)
            if span is None:
                continue
            s, e = span
            char_w[s:e] = [w] * (e - s)
            if rules:
                for a, b, x in scale.span_weights(turn.role, full[s:e]):
                    char_w[s + a:s + b] = [x] * (b - a)
        if media is not None:
            full, char_w = self.vision.expand(full, char_w, *media)
        ids, tok_w = self._tokenize(full, char_w)
        media_ids = self.vision.token_ids if media is not None else ()
        labels = [t if w > 0 and t not in media_ids else IGNORE_INDEX for t, w in zip(ids, tok_w)]
        binary = all(w in (0.0, 1.0) for w in tok_w)
        enc = {"input_ids": ids, "labels": labels, "loss_scale": None if binary else [max(w, 0.0) for w in tok_w]}
        if media is not None:
            enc["images"], enc["videos"] = media
        return enc

    def _message_weights(self, turns: list[Turn]) -> list[float]:
        weights = self.loss_scale.message_weights([t.role for t in turns])
        for k, t in enumerate(turns):
            if t.loss is True:
                weights[k] = weights[k] or 1.0
            elif t.loss is False:
                weights[k] = 0.0
        return weights

    def _encode_infer(self, row: dict) -> dict | None:
        turns, tools = self._turns(row.get("messages"), row.get("tools"))
        cont = bool(row.get("continue_final_message"))
        last = turns[-1].role
        if cont and last != "assistant":
            raise TemplateError(f"continue_final_message is set but the last message is {last!r}, not an assistant one")
        if not cont and last not in ("user", "tool"):
            raise TemplateError(f"infer mode: the last message must be from the user or a tool_response, got {last!r}"
                                " (set continue_final_message: true to continue an assistant message)")
        msgs, media = [t.message for t in turns], self._media(row)
        if media is not None:
            msgs = self.vision.to_parts(msgs, *media)
        text = self._render_checked(msgs, tools, add_generation_prompt=not cont, continue_final_message=cont)
        if media is None:
            return self._finish({"input_ids": self._tokenize(text)[0]})
        text, _ = self.vision.expand(text, [0.0] * len(text), *media)
        return self._finish({"input_ids": self._tokenize(text)[0], "images": media[0], "videos": media[1]})

    def _encode_rlhf(self, row: dict) -> dict | None:
        """Chosen and rejected conversations, each rendered whole; a row's images are in both (its prompt's)."""
        media = self._media(row)
        messages = row.get("messages")
        rejected = row.get("rejected_messages")
        if rejected is None:
            if row.get("rejected_response") is None:
                raise TemplateError("rlhf mode needs 'rejected_response' or 'rejected_messages' in the row")
            if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
                    or messages[-1].get("role") != "assistant":
                raise TemplateError("rlhf mode: the messages must end with the chosen assistant reply")
            rejected = [*messages[:-1], {**messages[-1], "content": row["rejected_response"]}]
        chosen = self._finish(self._encode_train(messages, row.get("tools"), media=media))
        other = self._finish(self._encode_train(rejected, row.get("tools"), media=media))
        if chosen is None or other is None:
            return None
        out = {f"chosen_{k}": v for k, v in chosen.items() if k != "length"}
        out.update({f"rejected_{k}": v for k, v in other.items() if k != "length"})
        out["length"] = max(chosen["length"], other["length"])
        return out

    def _encode_pt(self, row: dict) -> dict | None:
        text = row.get("text")
        if text is None:
            enc = self._encode_train(row.get("messages"), row.get("tools"), require_reply=False, media=self._media(row))
            ids = enc["input_ids"]
            if "images" in enc:  # image tokens are inputs, never targets
                return self._finish({**enc, "labels": [IGNORE_INDEX if t in self.vision.token_ids else t
                                                       for t in ids], "loss_scale": None})
        else:
            if not isinstance(text, str) or not text:
                raise TemplateError(f"pt mode: 'text' must be a non-empty string, got {text!r:.40}")
            ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
        return self._finish({"input_ids": ids, "labels": list(ids), "loss_scale": None})

    def _finish(self, enc: dict) -> dict | None:
        """Apply max_length: cut, drop or raise. In infer mode 'right' means 'left' (keep the prompt's end)."""
        n, limit = len(enc["input_ids"]), self.max_length
        if limit is not None and n > limit:
            strategy = self.truncation_strategy
            if self.mode == "infer" and strategy == "right":
                strategy = "left"
            if strategy == "raise":
                raise MaxLengthError(f"encoded length {n} exceeds max_length {limit} (truncation_strategy='raise')")
            if strategy == "delete":
                return None
            cut = slice(0, limit) if strategy == "right" else slice(n - limit, n)
            if enc.get("images") or enc.get("videos"):  # cutting through an image leaves tokens without features
                media_ids = self.vision.token_ids
                if sum(t in media_ids for t in enc["input_ids"][cut]) != sum(t in media_ids for t in enc["input_ids"]):
                    raise MaxLengthError(f"encoded length {n} exceeds max_length {limit} and truncating it would cut "
                                         "an image or video; raise --max_length or lower --max_pixels")
            enc = {k: (v[cut] if isinstance(v, list) and k not in ("images", "videos") else v) for k, v in enc.items()}
        enc["length"] = len(enc["input_ids"])
        return enc

    def _stop_token_ids(self) -> list[int]:
        """EOS plus every stop word that is a single token, so engines can stop on ids."""
        ids = []
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            ids.append(eos)
        for w in self.stop_words:
            enc = self.tokenizer(w, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.append(enc[0])
        return list(dict.fromkeys(ids))


_UNSET = object()


def raw_decoder(tokenizer: Any) -> Any:
    """The tokenizers library's tokenizer behind ``tokenizer`` when transformers' ``decode`` would only call its
    ``decode`` (a fast tokenizer that overrides neither method and cleans up no spaces), else None. A streamed
    reply decodes a window of ids twice per chunk; transformers' conversions around that call cost about as much
    as the call itself (the server's host work per token: benchmarks/RESULTS.md, 2026-11-30)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if (isinstance(tokenizer, TokenizersBackend) and cls.decode is PreTrainedTokenizerBase.decode
            and cls._decode is TokenizersBackend._decode and not tokenizer.clean_up_tokenization_spaces):
        return getattr(tokenizer, "_tokenizer", None)
    return None


def _as_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]
