"""The chat format: system/user/assistant turns with ChatML markers and a thinking block.

    <|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>user\n{prompt}<|im_end|>\n
    <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>\n

The four markers are single tokens (the tokenizer stage adds them as user-defined symbols). Every
assistant turn has a thinking block, empty when there is no reasoning (as Qwen3 does), so a
generation prompt always ends with `<|im_start|>assistant\n` and the model writes `<think>` next.

Training targets are the assistant turns from `<think>` through `<|im_end|>` (the model must
learn to stop); system, user, the `<|im_start|>assistant\n` headers and the newline after each
turn are context only.

`thinking: off` (a non-thinking model, e.g. Qwen3-4B-Instruct-2507): Qwen3's empty think block
`<think>\n\n</think>\n\n` is part of every assistant header instead, so a generation prompt ends
with it, the model writes the answer at once, and training targets are the answers only
(reasoning is not rendered). The default, `on`, renders exactly as above.
Text is encoded piece by piece between the markers, so a sequence's tokens are a pure function
of its text, and the loss-mask boundaries fall exactly on marker tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from data_recipes.config_fields import added

IM_START, IM_END, THINK, END_THINK = "<|im_start|>", "<|im_end|>", "<think>", "</think>"
SPECIAL_TOKENS = [IM_START, IM_END, THINK, END_THINK]
ROLES = ("system", "user", "assistant")
_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

# The same format for transformers' `apply_chat_template` (HF export ships it in tokenizer_config).
CHAT_TEMPLATE_JINJA = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<think>\\n' + (m.get('reasoning') or '') + '\\n</think>\\n\\n' }}"
    "{% endif %}"
    "{{ m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

THINKING = ("on", "off")
EMPTY_THINK = f"{THINK}\n\n{END_THINK}\n\n"
"""Qwen3's empty thinking block: what `thinking: off` puts after every assistant header."""


def chat_template(thinking: str = "on") -> str:
    """Our format as a transformers chat template (jinja) for `thinking` on or off."""
    if thinking == "on":
        return CHAT_TEMPLATE_JINJA
    check_thinking(thinking)
    return ("{% for m in messages %}"
            "{{ '<|im_start|>' + m['role'] + '\\n' }}"
            "{% if m['role'] == 'assistant' %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
            "{{ m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}"
            "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{% endif %}")


def check_thinking(thinking: str) -> None:
    if thinking not in THINKING:
        raise ValueError(f"thinking: {thinking!r}; one of {', '.join(THINKING)}")


@dataclass
class Message:
    role: str
    content: str
    reasoning: str = ""
    """The thinking block of an assistant turn (empty: an empty block)."""

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {', '.join(ROLES)}")


def render_turn(m: Message, thinking: str = "on") -> tuple[str, str]:
    """(header, body) of one turn (a newline follows); an assistant turn is trained on its body."""
    header = f"{IM_START}{m.role}\n"
    body = m.content + IM_END
    if m.role == "assistant":
        if thinking == "off":
            header += EMPTY_THINK
        else:
            body = f"{THINK}\n{m.reasoning}\n{END_THINK}\n\n" + body
    return header, body


def render(messages: list[Message], add_generation_prompt: bool = False,
           thinking: str = "on") -> str:
    text = "".join(h + b + "\n" for h, b in (render_turn(m, thinking) for m in messages))
    if not add_generation_prompt:
        return text
    return text + f"{IM_START}assistant\n" + (EMPTY_THINK if thinking == "off" else "")


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, markers as their single special tokens, the rest encoded between them."""
    ids: list[int] = []
    for piece in _SPLIT.split(text):
        if not piece:
            continue
        if piece in SPECIAL_TOKENS:
            tid = tokenizer.token_id(piece)
            if tid is None:
                raise ValueError(f"the tokenizer has no {piece!r} token: train it with the chat "
                                 "special tokens (tokenizer stage `special_tokens`)")
            ids.append(tid)
        else:
            ids.extend(tokenizer.encode(piece))
    return ids


def encode_chat(tokenizer, messages: list[Message],
                thinking: str = "on") -> tuple[list[int], list[int]]:
    """(token ids, loss mask): the mask is 1 exactly on the assistant bodies' tokens."""
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        header, body = render_turn(m, thinking)
        for text, trained in ((header, False), (body, m.role == "assistant"), ("\n", False)):
            part = encode_text(tokenizer, text)
            ids.extend(part)
            mask.extend([int(trained)] * len(part))
    return ids, mask


def encode_prompt(tokenizer, messages: list[Message], thinking: str = "on") -> list[int]:
    """Tokens a model continues from to write the next assistant turn."""
    return encode_text(tokenizer, render(messages, add_generation_prompt=True, thinking=thinking))


def parse_assistant(text: str) -> Message:
    """An assistant turn back from generated text (up to `<|im_end|>`; a missing close is lenient)."""
    text = text.split(IM_END, 1)[0]
    reasoning = ""
    if text.startswith(THINK):
        inner, closed, rest = text[len(THINK):].partition(END_THINK)
        reasoning = inner.removeprefix("\n").removesuffix("\n")
        text = rest.removeprefix("\n\n") if closed else ""  # cut off while thinking: no answer
    return Message("assistant", text, reasoning)


@dataclass(kw_only=True)
class PromptFormat:
    """How a prompt reaches a model and where its answer is read: the fields of every config that
    samples a model (generators, eval, rl). The final answer of a response is `final_text`."""

    prompt_format: str = "chat"
    """chat (our chat template) | completion (`completion_template`, for a base model)."""
    completion_template: str = "{prompt}"
    stop: list[str] = field(default_factory=list)
    """Text that ends a generation (cut there), besides the end-of-turn / end-of-document tokens."""
    thinking: str = added("on")
    """chat: on (the model writes its thinking block) | off (the prompt ends with Qwen3's empty
    think block; for non-thinking models such as Qwen3-4B-Instruct-2507)."""

    def __post_init__(self):
        if self.prompt_format not in ("chat", "completion"):
            raise ValueError(f"prompt_format: {self.prompt_format!r}; one of chat, completion")
        check_thinking(self.thinking)


def final_text(text: str, prompt_format: str) -> str:
    """What is scored: a chat answer without its thinking block, or the completion."""
    return parse_assistant(text).content if prompt_format == "chat" else text
