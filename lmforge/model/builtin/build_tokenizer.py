"""Train the byte-level BPE tokenizer that ships with ``builtin:tiny``.

Run ``python -m lmforge.model.builtin.build_tokenizer`` to rebuild ``tokenizer/``. The corpus is
written here: plain English and Chinese sentences about assistants, arithmetic, tools and
weather, so that the built-in datasets tokenize into short sequences. Digits are split one by
one (as Qwen's tokenizer does) so the arithmetic task is learnable digit by digit.
"""
from __future__ import annotations

import random
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                  "<tool_response>", "</tool_response>", "<think>", "</think>"]

CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_ENGLISH = """
I am an AI assistant. I can answer questions, write text, solve problems and help with code.
Hello! How can I help you today? Who are you? What is your name? Who made you? Who trained you?
I was developed by a team of researchers. My name is the assistant, and I am a language model.
You are a helpful assistant. Please answer the question briefly and correctly.
What is the weather like in Paris today? It is sunny and warm, with a light wind from the west.
The temperature in London is twelve degrees and it is raining. Tokyo is cloudy. Berlin is cold.
Let me calculate that for you. The answer is the sum of the two numbers. The result is correct.
Think step by step. First add the ones, then carry the tens. The final answer is below.
Call the calculator tool with the expression. Call the weather tool with the city name.
The function returns a JSON object with the result. Thank you for your question, have a nice day.
Machine learning models learn from data. Training lowers the loss, and evaluation measures accuracy.
Large language models generate text one token at a time. A tokenizer turns text into tokens.
This is a short story about a cat who lived in a small house near the river and liked to read.
Good morning. Good night. Yes, of course. No, I am sorry, I cannot do that. Sure, here it is.
The quick brown fox jumps over the lazy dog. Water boils at one hundred degrees Celsius.
"""

_CHINESE = """
你好！我是一个人工智能助手，可以回答问题、写作和解决问题。你是谁？你叫什么名字？谁开发了你？
我是由研究团队开发的语言模型。很高兴为你服务。今天天气怎么样？北京今天晴，气温二十度。
请一步一步地思考。答案是两个数字的和。谢谢你的问题，祝你有美好的一天。
"""


def build_corpus(seed: int = 0, n_arith: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = [ln.strip() for ln in (_ENGLISH + _CHINESE).splitlines() if ln.strip()]
    corpus = lines * 20
    for _ in range(n_arith):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        corpus.append(f"What is {a} {op} {b}? {a} {op} {b} = {eval(f'{a}{op}{b}')}")
    corpus.append('{"name": "calculator", "arguments": {"expression": "3 + 4"}}')
    corpus.append('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}')
    return corpus


def build(vocab_size: int = 1024, out_dir: Path | None = None) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir or Path(__file__).parent / "tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=1024,
    )
    fast.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(build())
