"""Streams decoded from each token's bytes (no tokenizer call per chunk) send exactly what the tokenizer path sends."""
from __future__ import annotations

import json
import random

import pytest

from lmforge.infer.utils import IncrementalDecoder, StopStrings
from lmforge.template import get_template
from lmforge.template.token_bytes import TokenBytes


def _ids(tokenizer, rng: random.Random, source: str) -> list[int]:
    if source == "text":
        text = "你好，世界! héllo 😀 done. " * rng.randint(1, 4) + "<|im_end|> tail xyz more"
        return tokenizer.encode(text, add_special_tokens=False)
    high = [i for i in range(len(tokenizer)) if tokenizer.convert_ids_to_tokens(i)[0] >= "\u00a1"]
    return [rng.choice(high) if rng.random() < 0.5 else rng.randrange(len(tokenizer))
            for _ in range(rng.randint(5, 120))]


def _pieces(ids: list[int], rng: random.Random, most: int):
    """``ids`` cut into consecutive pieces of 1 to ``most`` ids (the tokens one chunk carries)."""
    k = 0
    while k < len(ids):
        n = rng.randint(1, most)
        yield ids[k:k + n]
        k += n


def test_token_bytes_decode_any_ids_as_the_tokenizer_does(tiny_tokenizer):
    table = TokenBytes.for_tokenizer(tiny_tokenizer)
    assert table is not None
    rng = random.Random(1)
    added = list(tiny_tokenizer.added_tokens_decoder)
    for _ in range(2000):
        ids = [rng.choice(added) if rng.random() < 0.1 else i for i in _ids(tiny_tokenizer, rng, "random")][:20]
        assert table.join(ids).decode("utf-8", "replace") == tiny_tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("source", ["text", "random"])
def test_the_byte_decoder_sends_what_the_tokenizer_decoder_sends_without_calling_it(tiny_tokenizer, source):
    tpl = get_template(tiny_tokenizer, "chatml")  # decode cuts at stop tokens and strips trailing stop words
    table = tpl.token_bytes()
    held = tpl.decode_cut_ids()
    rng = random.Random(0)
    calls = []

    def counted(ids):
        calls.append(len(ids))
        return tpl.decode(ids)

    byte_streams = 0
    for trial in range(40):
        ids = _ids(tiny_tokenizer, rng, source)
        ids = [i for i in ids if i not in held] if trial % 2 else ids  # odd trials: never back to the tokenizer
        plain = IncrementalDecoder(tpl.decode, StopStrings(["xyz"]))
        calls.clear()
        fast = IncrementalDecoder(counted, StopStrings(["xyz"]), window=True, hold_ids=held, token_bytes=table,
                                  strip=tpl.strip_stop_words)
        for step in _pieces(ids, rng, 5):
            assert fast.push(step) == plain.push(step)
        final = tpl.decode(ids)
        assert fast.finish(final) == plain.finish(final)
        assert fast.sent == plain.sent and fast.stopped == plain.stopped
        if trial % 2:
            assert calls == [], "a stream without stop or pad ids never calls the tokenizer"
            byte_streams += 1
        elif held.intersection(ids) and not fast.stopped:
            assert fast._bytes is None  # a held id sends the stream back to the tokenizer
    assert byte_streams == 20


class _Lying:
    """A tokenizers backend that spells one token wrongly (its decode stays right)."""

    def __init__(self, backend, token_id: int):
        self.backend, self.token_id = backend, token_id

    def id_to_token(self, i):
        return "Ã©" if i == self.token_id else self.backend.id_to_token(i)

    def decode(self, ids, skip_special_tokens=False):
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def test_a_token_whose_bytes_disagree_sends_its_stream_back_to_the_tokenizer(tiny_tokenizer, caplog):
    tpl = get_template(tiny_tokenizer, "chatml")
    ids = tiny_tokenizer.encode("plain words then 😀 and more words", add_special_tokens=False)
    good = TokenBytes.for_tokenizer(tiny_tokenizer)
    liar = TokenBytes(_Lying(good._backend, ids[3]), good._alphabet)
    plain = IncrementalDecoder(tpl.decode)
    fast = IncrementalDecoder(tpl.decode, window=True, token_bytes=liar, strip=tpl.strip_stop_words)
    with caplog.at_level("INFO", logger="lmforge.template.token_bytes"):
        out = [(fast.push([i]), plain.push([i])) for i in ids]
        assert liar.join(ids[:3]) == good.join(ids[:3]) and liar.join(ids) is None
    assert all(a == b for a, b in out) and fast._bytes is None
    assert f"token {ids[3]} does not decode as its bytes" in caplog.text
    final = tpl.decode(ids)
    assert fast.sent + fast.finish(final) == final == "plain words then 😀 and more words"


def _rebuilt(tiny_tokenizer, decoder):
    """The tiny tokenizer with another decoder (a generic fast tokenizer: Qwen2Tokenizer would set its own)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tiny_tokenizer.backend_tokenizer.to_str())
    spec["decoder"] = decoder(spec["decoder"])
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))


def test_tokenizers_whose_decode_is_not_their_bytes_keep_the_tokenizer(tiny_tokenizer):
    assert TokenBytes.for_tokenizer(tiny_tokenizer) is not None
    assert TokenBytes.for_tokenizer(_rebuilt(tiny_tokenizer, lambda d: d)) is not None  # the generic class too
    metaspace = _rebuilt(tiny_tokenizer, lambda d: {"type": "Metaspace", "replacement": "\u2581",
                                                    "prepend_scheme": "always", "split": True})
    assert TokenBytes.for_tokenizer(metaspace) is None
    stripped = _rebuilt(tiny_tokenizer, lambda d: {"type": "Sequence", "decoders": [
        d, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]})
    assert TokenBytes.for_tokenizer(stripped) is None
    tiny_tokenizer.clean_up_tokenization_spaces = True  # transformers' decode then rewrites the text
    try:
        assert TokenBytes.for_tokenizer(tiny_tokenizer) is None
    finally:
        tiny_tokenizer.clean_up_tokenization_spaces = False


def test_reply_streams_from_token_bytes_match_the_tokenizer_path(tiny_tokenizer):
    """The chunks a served stream sends: the same with and without the byte table, and no decode call with it."""
    from lmforge.infer.protocol import RequestConfig
    from lmforge.infer.reply_stream import ReplyStream
    from lmforge.infer.token_streams import ReplyBuilder, _JobView
    from lmforge.serve.schemas import PromptRequest

    tpl = get_template(tiny_tokenizer, "chatml")
    info = {"template": tpl, "stop_words": ["xyz"], "stop_token_ids": list(tpl.stop_token_ids), "pad_token_id": None,
            "model_name": "m", "vocab_size": len(tiny_tokenizer)}
    slow_tpl = get_template(tiny_tokenizer, "chatml")
    slow_tpl._token_bytes = None
    fast, slow = ReplyBuilder(info), ReplyBuilder({**info, "template": slow_tpl})
    calls = []
    fast._decode = lambda ids: calls.append(ids) or tpl.decode(ids)
    cfg = RequestConfig(max_tokens=1000, ignore_eos=True)
    ids = tiny_tokenizer.encode("你好 héllo 😀 words, then xyz and after", add_special_tokens=False)
    streams = [ReplyStream(b, _JobView(PromptRequest(prompt=[1]), 1000, range(1)), cfg) for b in (fast, slow)]
    rng = random.Random(0)
    for piece in _pieces(ids, rng, 3):
        step = [((t,), None) for t in piece]
        a, b = (s.steps(step) for s in streams)
        assert (a and [c.delta.content for c in a.choices]) == (b and [c.delta.content for c in b.choices])
    assert calls == [] and streams[0].decoders[0].sent == "你好 héllo 😀 words, then "
