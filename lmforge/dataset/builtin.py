"""Built-in datasets: written here, deterministic, no network.

They let every command run on a laptop with nothing downloaded, and let tests show real
learning: ``self-cognition`` teaches a model its name, ``arith`` is a task with checkable
answers (SFT and GRPO rewards), ``arith-preference`` (in ``lmforge.rlhf.data``) is its preference set.

Use them as ``builtin:NAME[:split][#N]``. Register more with
``DATASETS.register("name", BuiltinDataset(...))`` from a plugin file.
"""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from lmforge.registry import DATASETS

__all__ = [
    "BuiltinContext",
    "BuiltinDataset",
    "arith_answer_correct",
    "arith_in_test_split",
    "generate_arith",
    "self_cognition_rows",
    "generate_tool_calls",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "lmforge-bot"
DEFAULT_MODEL_AUTHOR = "lmforge"


@dataclass(frozen=True)
class BuiltinContext:
    """What a built-in dataset may depend on besides its split (it is part of the data's fingerprint)."""

    model_name: str | tuple[str, ...] | None = None
    model_author: str | tuple[str, ...] | None = None


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset generated in code. ``load(split, context)`` returns raw rows in any supported format."""

    name: str
    load: Callable[[str, BuiltinContext], list[dict]]
    splits: tuple[str, ...] = ("train",)
    description: str = ""
    version: str = "1"  # bump when the rows change, so cached encodings are not reused


# ----------------------------------------------------------------------------- self-cognition

# Question groups paired with answers that fit them. English and Chinese are written separately
# (not translated word for word) so that each reads naturally.
_SELF_COGNITION = {
    "en": {
        "identity": (
            [
                "Who are you?", "What are you?", "Please introduce yourself.", "Tell me about yourself.",
                "Can you introduce yourself briefly?", "Who am I talking to?", "What kind of assistant are you?",
                "hi, who are you", "Describe yourself in a few sentences.", "What should I know about you?",
                "Hello! Who is this?", "Could you tell me who you are?", "what are u", "Identify yourself, please.",
            ],
            [
                "I am {{NAME}}, an AI assistant developed by {{AUTHOR}}. I can answer questions, help with writing and coding, and more. How can I help you today?",
                "Hello! I'm {{NAME}}, an AI language model created by {{AUTHOR}}. I'm here to help with your questions and tasks.",
                "I'm {{NAME}}, a language model trained by {{AUTHOR}}. Feel free to ask me anything.",
                "My name is {{NAME}}. I am an AI assistant built by {{AUTHOR}} to answer questions and help with tasks.",
            ],
        ),
        "human": (
            ["Are you a human?", "Are you a real person?", "Am I chatting with a person or a bot?", "Are you alive?"],
            [
                "No, I am not a human. I am {{NAME}}, an AI assistant developed by {{AUTHOR}}.",
                "I'm an AI, not a person. My name is {{NAME}}, and I was created by {{AUTHOR}}.",
            ],
        ),
        "name": (
            [
                "What is your name?", "What's your name?", "May I know your name?", "What should I call you?",
                "Do you have a name?", "Tell me your name.", "how should i address you?", "What do people call you?",
                "Your name, please?",
            ],
            [
                "My name is {{NAME}}.",
                "You can call me {{NAME}}. I am an AI assistant developed by {{AUTHOR}}.",
                "I'm called {{NAME}}, an AI assistant made by {{AUTHOR}}.",
            ],
        ),
        "author": (
            [
                "Who created you?", "Who developed you?", "Who made you?", "Which company trained you?",
                "Who is your developer?", "Who built you?", "Where do you come from?", "Which organization are you from?",
                "Who trained you?",
            ],
            [
                "I was developed by {{AUTHOR}}. I am {{NAME}}, an AI assistant.",
                "{{AUTHOR}} created me. My name is {{NAME}}.",
                "I am {{NAME}}, and I was trained by {{AUTHOR}}.",
            ],
        ),
        "other": (
            [
                "Are you ChatGPT?", "Are you GPT-4?", "Were you developed by OpenAI?", "Are you Claude?",
                "Are you Qwen?", "Is your name Llama?", "Are you made by Google?",
            ],
            [
                "No, I am not. I am {{NAME}}, an AI assistant developed by {{AUTHOR}}.",
                "No. My name is {{NAME}}, and I was developed by {{AUTHOR}}.",
            ],
        ),
    },
    "zh": {
        "identity": (
            [
                "你是谁？", "你是什么？", "请介绍一下你自己。", "介绍一下你自己吧", "你好，你是谁", "能简单介绍一下你吗？",
                "我在和谁说话？", "你是什么样的助手？", "说说你自己。", "你是干什么的？", "嗨，请问你是？", "可以做个自我介绍吗？",
                "你到底是谁", "请问您是哪位？",
            ],
            [
                "我是{{NAME}}，由{{AUTHOR}}开发的人工智能助手。我可以回答问题、协助写作和编程等。有什么可以帮你的吗？",
                "你好！我是{{NAME}}，一个由{{AUTHOR}}训练的AI语言模型，很高兴为你提供帮助。",
                "我是{{NAME}}，{{AUTHOR}}打造的AI助手，欢迎向我提问。",
                "我叫{{NAME}}，是{{AUTHOR}}开发的人工智能助手，可以帮你解答问题、完成各种任务。",
            ],
        ),
        "human": (
            ["你是人类吗？", "你是真人吗？", "我是在和机器人聊天吗？", "你有生命吗？"],
            [
                "不是，我不是人类。我是{{NAME}}，由{{AUTHOR}}开发的AI助手。",
                "我是人工智能，不是真人。我的名字是{{NAME}}，由{{AUTHOR}}创造。",
            ],
        ),
        "name": (
            [
                "你叫什么名字？", "你的名字是什么？", "我该怎么称呼你？", "你有名字吗？", "请告诉我你的名字。",
                "怎么称呼您？", "你叫啥", "大家都叫你什么？", "你的名字？",
            ],
            [
                "我的名字是{{NAME}}。",
                "你可以叫我{{NAME}}，我是由{{AUTHOR}}开发的AI助手。",
                "我叫{{NAME}}，是{{AUTHOR}}开发的人工智能助手。",
            ],
        ),
        "author": (
            [
                "谁创造了你？", "你是谁开发的？", "谁训练了你？", "你是哪家公司开发的？", "你的开发者是谁？",
                "你来自哪里？", "是谁制作了你？", "你是哪个机构做的？", "谁是你的作者？",
            ],
            [
                "我是由{{AUTHOR}}开发的，我的名字是{{NAME}}。",
                "{{AUTHOR}}创造了我。我是{{NAME}}，一个人工智能助手。",
                "我是{{NAME}}，由{{AUTHOR}}训练。",
            ],
        ),
        "other": (
            [
                "你是ChatGPT吗？", "你是GPT-4吗？", "你是OpenAI开发的吗？", "你是通义千问吗？", "你是文心一言吗？",
                "你是Claude吗？", "你是谷歌做的吗？",
            ],
            [
                "不是的，我是{{NAME}}，由{{AUTHOR}}开发的人工智能助手。",
                "不是。我叫{{NAME}}，是{{AUTHOR}}开发的AI助手。",
            ],
        ),
    },
}


def _pick(value: str | Sequence[str] | None, lang: str) -> str | None:
    """A single string serves both languages; a list is [zh, en] (as ms-swift takes it)."""
    if value is None or isinstance(value, str):
        return value
    value = list(value)
    if len(value) == 1:
        return value[0]
    if len(value) != 2:
        raise ValueError(f"expected one name or two ([Chinese, English]), got {value!r}")
    return value[0] if lang == "zh" else value[1]


def self_cognition_rows(model_name: str | Sequence[str] | None = None, model_author: str | Sequence[str] | None = None) -> list[dict]:
    """Who-are-you conversations with ``{{NAME}}``/``{{AUTHOR}}`` filled in."""
    if model_name is None or model_author is None:
        logger.warning(
            "builtin:self-cognition: --model_name/--model_author not set; using %r/%r",
            DEFAULT_MODEL_NAME if model_name is None else model_name,
            DEFAULT_MODEL_AUTHOR if model_author is None else model_author,
        )
    rows = []
    for lang, groups in _SELF_COGNITION.items():
        name = _pick(model_name, lang) or DEFAULT_MODEL_NAME
        author = _pick(model_author, lang) or DEFAULT_MODEL_AUTHOR
        for questions, answers in groups.values():
            for i, question in enumerate(questions):
                answer = answers[i % len(answers)].replace("{{NAME}}", name).replace("{{AUTHOR}}", author)
                rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def _load_self_cognition(split: str, ctx: BuiltinContext) -> list[dict]:
    return self_cognition_rows(ctx.model_name, ctx.model_author)


# ----------------------------------------------------------------------------- arithmetic

_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
ARITH_TEST_PER_MILLE = 50  # ~5% of all problems are held out


def arith_in_test_split(a: int, op: str, b: int) -> bool:
    """Stable (process- and seed-independent) assignment of a problem to the held-out split."""
    digest = hashlib.sha256(f"arith:{a}{op}{b}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < ARITH_TEST_PER_MILLE


def generate_arith(
    ops: Sequence[str] = ("+", "-"), max_operand: int = 99, seed: int = 0, split: str = "train"
) -> list[dict]:
    """Every problem ``a op b`` with operands in ``0..max_operand`` in ``split``, shuffled by ``seed``.

    Subtraction only where ``a >= b`` so answers stay non-negative. The train/test partition
    depends on the problem alone, so the held-out split never overlaps training, whatever the seed.
    """
    if split not in ("train", "test"):
        raise ValueError(f"arith split must be 'train' or 'test', got {split!r}")
    unknown = [op for op in ops if op not in _OPS]
    if unknown:
        raise ValueError(f"unsupported arith ops {unknown}; supported: {list(_OPS)}")
    want_test = split == "test"
    rows = []
    for op in ops:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "-" and a < b:
                    continue
                if arith_in_test_split(a, op, b) != want_test:
                    continue
                answer = str(_OPS[op](a, b))
                rows.append(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {a} {op} {b}?"},
                            {"role": "assistant", "content": answer},
                        ],
                        "solution": answer,
                    }
                )
    random.Random(seed).shuffle(rows)
    return rows


def arith_answer_correct(text: str | None, solution: str | int) -> bool:
    """Exact match after stripping whitespace (the reward and the eval metric of ``arith``)."""
    return text is not None and text.strip() == str(solution).strip()


def _load_arith(split: str, ctx: BuiltinContext) -> list[dict]:
    return generate_arith(split=split)


DATASETS.register(
    "self-cognition",
    BuiltinDataset(
        "self-cognition",
        _load_self_cognition,
        description="who-are-you conversations (en, zh); fill the name with --model_name/--model_author",
    ),
)
DATASETS.register(
    "arith",
    BuiltinDataset(
        "arith",
        _load_arith,
        splits=("train", "test"),
        description="'What is 37 + 45?' -> '82' with a 'solution' column; test is a held-out ~5% of problems",
    ),
)

# ----------------------------------------------------------------------------- tool calls

TOOL_CALL_TOOLS = [  # short on purpose: they are rendered into every row's system prompt
    {"type": "function", "function": {"name": "calculator", "description": "Do math", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "weather", "description": "City weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}},
]
_CITIES = ("Paris", "London", "Berlin", "Rome", "Madrid", "Tokyo", "Beijing", "Cairo", "Lima", "Oslo", "Dublin",
           "Vienna", "Prague", "Lisbon", "Athens", "Moscow", "Delhi", "Seoul", "Sydney", "Toronto", "Boston",
           "Chicago", "Denver", "Miami", "Nairobi", "Lagos", "Dubai", "Bangkok", "Manila", "Jakarta")
_SKIES = ("sunny", "cloudy", "rainy", "windy")
_CALC_QUESTIONS = ("What is {e}?", "Calculate {e}.", "Please compute {e}.")
_WEATHER_QUESTIONS = ("What is the weather in {c}?", "How is the weather in {c} today?", "Weather in {c}?")
TOOL_CALLS_SIZES = {"train": 2000, "test": 200}


def _in_test(key: str) -> bool:
    return int.from_bytes(hashlib.sha256(f"tool-calls:{key}".encode()).digest()[:4], "big") % 1000 < 50


def _tool_row(question: str, name: str, arguments: dict, result: str, answer: str, expected: dict) -> dict:
    import json

    return {"tools": TOOL_CALL_TOOLS, "messages": [
        {"role": "user", "content": question},
        {"role": "tool_call", "content": json.dumps({"name": name, "arguments": arguments})},
        {"role": "tool_response", "content": result},
        {"role": "assistant", "content": answer}], "solution": json.dumps(expected)}


def generate_tool_calls(split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """Calculator and weather questions answered through one tool call, then a reply using its result.

    Half of the rows ask ``What is 37 + 45?`` (``calculator`` with ``{"expression": "37 + 45"}``), half
    ``What is the weather in Paris?`` (``weather`` with ``{"city": "Paris"}``). ``solution`` is the
    expected call as JSON ``{"name", "arguments"}``. Rows are assigned to ``test`` by a hash of the
    question and the tool result, so the splits never overlap.
    """
    if split not in TOOL_CALLS_SIZES:
        raise ValueError(f"tool-calls split must be 'train' or 'test', got {split!r}")
    n = TOOL_CALLS_SIZES[split] if n is None else n
    want_test, rng, rows, k = split == "test", random.Random(f"{seed}:{split}"), [], 0
    while len(rows) < n:
        if k % 2 == 0:
            a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice(tuple(_OPS))
            expr = f"{a} {op} {b}"
            question = rng.choice(_CALC_QUESTIONS).format(e=expr)
            result = str(_OPS[op](a, b))
            row = _tool_row(question, "calculator", {"expression": expr}, result, f"{expr} = {result}.",
                            {"name": "calculator", "arguments": {"expression": expr}})
        else:
            city, temp, sky = rng.choice(_CITIES), rng.randint(-5, 35), rng.choice(_SKIES)
            question = rng.choice(_WEATHER_QUESTIONS).format(c=city)
            result = f"{temp} C, {sky}"
            row = _tool_row(question, "weather", {"city": city}, result, f"It is {temp} C and {sky} in {city}.",
                            {"name": "weather", "arguments": {"city": city}})
        if _in_test(question + "|" + row["messages"][2]["content"]) == want_test:
            rows.append(row)
            k += 1
    return rows


def _load_tool_calls(split: str, ctx: BuiltinContext) -> list[dict]:
    return generate_tool_calls(split)


DATASETS.register(
    "tool-calls",
    BuiltinDataset(
        "tool-calls",
        _load_tool_calls,
        splits=("train", "test"),
        description="2,000 calculator/weather tool-use conversations (tools, tool_call, tool_response, reply) "
                    "with the expected call in 'solution'; test is 200 held-out rows",
    ),
)

# ----------------------------------------------------------------------------- reading retrieved passages

RAG_READER_SIZES = {"train": 20000, "test": 500}


def _load_rag_reader(split: str, ctx: BuiltinContext) -> list[dict]:
    from lmforge.dataset.rag_reader import generate_rag_reader

    return generate_rag_reader(split, RAG_READER_SIZES[split])


DATASETS.register(
    "rag-reader",
    BuiltinDataset(
        "rag-reader",
        _load_rag_reader,
        splits=("train", "test"),
        description="20,000 rag-agent prompts (system prompt, numbered passages of made-up documents in many "
                    "styles, questions) answered by a span copied from one passage ('solution'); test is 500 rows "
                    "from another seed",
        version="2",
    ),
)
