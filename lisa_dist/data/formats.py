"""Record formats to token ids and labels: Alpaca, chat messages, ShareGPT conversations and plain text.

Instruction formats label only the responses (every assistant turn of a conversation, rendered with the
tokenizer's own chat template when it has one); plain text labels every token (continued pre-training)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from lisa_dist.data.records import Record
from lisa_dist.errors import DataError

IGNORE_INDEX = -100
FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    """`IGNORE_INDEX` on prompt tokens, the token id on response tokens (unshifted)."""


class Fields:
    """A record's keys through `data.fields` ({format key: the key in the user's records})."""

    def __init__(self, mapping: Mapping[str, str] | None) -> None:
        self.mapping = dict(mapping or {})

    def key(self, name: str) -> str:
        return self.mapping.get(name, name)

    def describe(self, name: str) -> str:
        source = self.key(name)
        return repr(source) if source == name else f"{source!r} (data.fields.{name})"

    def has(self, record: dict[str, Any], name: str) -> bool:
        return self.key(name) in record

    def string(self, where: str, record: dict[str, Any], name: str, *, optional: bool = False) -> str:
        value = record.get(self.key(name))
        if value is None and optional:
            return ""
        if self.key(name) not in record:
            raise DataError(f"{where}: missing key {self.describe(name)}; the record has keys {sorted(record)}")
        if not isinstance(value, str):
            raise DataError(f"{where}: {self.describe(name)} must be a string, got {type(value).__name__}")
        return value


def format_alpaca_prompt(instruction: str, input_text: str) -> str:
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def tokenize_records(records: list[Record], tokenizer: Tokenizer, fmt: str = "auto",
                     fields: Mapping[str, str] | None = None) -> list[TokenizedExample]:
    if fmt not in FORMATS:
        raise ValueError(f"data format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; responses must end with one")
    keys = Fields(fields)
    if fmt == "auto":
        fmt = detect_format(*records[0], keys)
    tokenize = {"alpaca": _alpaca, "chat": _chat, "sharegpt": _sharegpt, "text": _text}[fmt]
    return [tokenize(where, record, tokenizer, keys) for where, record in records]


def detect_format(where: str, record: dict[str, Any], keys: Fields) -> str:
    for fmt, key in (("chat", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction"), ("text", "text")):
        if keys.has(record, key):
            return fmt
    raise DataError(f"{where}: cannot tell the data format from keys {sorted(record)}; expected 'instruction' and "
                    "'output' (alpaca), 'messages' (chat), 'conversations' (sharegpt) or 'text'; set data.format, "
                    "or data.fields to name your keys")


def _alpaca(where: str, record: dict[str, Any], tokenizer: Tokenizer, keys: Fields) -> TokenizedExample:
    instruction = keys.string(where, record, "instruction")
    input_text = keys.string(where, record, "input", optional=True)
    output = keys.string(where, record, "output")
    prompt = _bos(tokenizer) + tokenizer.encode(format_alpaca_prompt(instruction, input_text), add_special_tokens=False)
    response = tokenizer.encode(output, add_special_tokens=False) + [tokenizer.eos_token_id]
    return TokenizedExample(input_ids=prompt + response, labels=[IGNORE_INDEX] * len(prompt) + response)


def _text(where: str, record: dict[str, Any], tokenizer: Tokenizer, keys: Fields) -> TokenizedExample:
    ids = _bos(tokenizer) + tokenizer.encode(keys.string(where, record, "text"), add_special_tokens=False)
    ids.append(tokenizer.eos_token_id)
    return TokenizedExample(input_ids=ids, labels=list(ids))


def _bos(tokenizer: Tokenizer) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _turns(where: str, record: dict[str, Any], keys: Fields, name: str, role_key: str,
           text_key: str) -> list[dict[str, Any]]:
    turns = record.get(keys.key(name))
    if keys.key(name) not in record:
        raise DataError(f"{where}: missing key {keys.describe(name)}; expected a list of {{{role_key!r}, "
                        f"{text_key!r}}} objects")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {keys.describe(name)} must be a non-empty list of {{{role_key!r}, {text_key!r}}} "
                        "objects")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataError(f"{where}: {keys.key(name)}[{index}] must be an object with {role_key!r} and {text_key!r}")
        if not isinstance(turn[text_key], str):
            raise DataError(f"{where}: {keys.key(name)}[{index}][{text_key!r}] must be a string, "
                            f"got {type(turn[text_key]).__name__}")
    return turns


def _chat(where: str, record: dict[str, Any], tokenizer: Tokenizer, keys: Fields) -> TokenizedExample:
    messages = [{"role": m["role"], "content": m["content"]}
                for m in _turns(where, record, keys, "messages", "role", "content")]
    for index, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise DataError(f"{where}: {keys.key('messages')}[{index}] has unknown role {message['role']!r}; "
                            f"expected one of {', '.join(ROLES)}")
    return tokenize_messages(where, messages, tokenizer)


def _sharegpt(where: str, record: dict[str, Any], tokenizer: Tokenizer, keys: Fields) -> TokenizedExample:
    messages = []
    system = keys.string(where, record, "system", optional=True)
    if system:
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(_turns(where, record, keys, "conversations", "from", "value")):
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(f"{where}: {keys.key('conversations')}[{index}] has unknown 'from' {turn['from']!r}; "
                            "expected one of system, human, gpt")
        messages.append({"role": role, "content": turn["value"]})
    return tokenize_messages(where, messages, tokenizer)


def tokenize_messages(where: str, messages: list[dict[str, str]], tokenizer: Tokenizer) -> TokenizedExample:
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant message; expected at least one to train on")
    if getattr(tokenizer, "chat_template", None):
        segments = _template_segments(where, messages, tokenizer)
    else:
        segments = _plain_segments(messages, tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_response in segments:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if is_response and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        input_ids += ids
        labels += ids if is_response else [IGNORE_INDEX] * len(ids)
    return TokenizedExample(input_ids=input_ids, labels=labels)


def _template_segments(where: str, messages: list[dict[str, str]],
                       tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_response) pieces.

    Each assistant response is the text between the render that ends in a generation prompt and the
    render that includes the response, so role markers stay unlabelled whatever the template looks like.
    """
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = _render(where, tokenizer, messages[:index], add_generation_prompt=True)
            segments.append((_suffix(where, rendered, prompt), False))
            rendered = prompt
        full = _render(where, tokenizer, messages[:index + 1], add_generation_prompt=False)
        segments.append((_suffix(where, rendered, full), message["role"] == "assistant"))
        rendered = full
    return [segment for segment in segments if segment[0] or segment[1]]


def _render(where: str, tokenizer: Tokenizer, messages: list[dict[str, str]],
            add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    # Templates raise whatever jinja or their own raise_exception throws; report it against the record.
    except Exception as error:
        raise DataError(f"{where}: the tokenizer's chat template failed: {error}") from error


def _suffix(where: str, prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        raise DataError(f"{where}: the chat template renders a conversation differently from its prefix, "
                        "so assistant turns cannot be located; expected an append-only template")
    return text[len(prefix):]


def _plain_segments(messages: list[dict[str, str]], tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    bos = "" if tokenizer.bos_token_id is None else getattr(tokenizer, "bos_token", "")
    segments: list[tuple[str, bool]] = [(bos, False)]
    for message in messages:
        if message["role"] == "assistant":
            segments += [("Assistant:\n", False), (message["content"], True)]
        else:
            segments.append((f"{message['role'].capitalize()}:\n{message['content']}\n", False))
    return [segment for segment in segments if segment[0] or segment[1]]
