"""What makes one preference record usable: its keys, types, message roles and reward values."""

from __future__ import annotations

import math
import re
from numbers import Real
from typing import Any, Mapping

__all__ = ["LocatedRecords", "MESSAGE_ROLES", "PreferenceDataError", "record_chars", "validate_record"]

REQUIRED_KEYS = ("prompt", "chosen_response", "rejected_response")
REWARD_KEYS = ("chosen_reward", "rejected_reward")
# Roles a chat template is written for; "tool" turns (tool results) are rendered by the
# templates of tool-using models, and the template path hands messages over unchanged.
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
# JSON "\ud800" escapes decode to lone surrogates, which no tokenizer can encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


class PreferenceDataError(ValueError):
    """A preference record that cannot be used; the message names its file and line."""


class LocatedRecords(list):
    """Records that remember where each came from (``where(index)``), for error messages.

    The base names records by their index in ``source`` (an in-memory list);
    file readers name lines or rows.
    """

    def __init__(self, records: list[dict], source: str):
        super().__init__(records)
        self.source = source

    def where(self, index: int) -> str:
        return f"{self.source}, record {index}"


def _check_text(text: str, what: str, where: str) -> None:
    if not text.isascii() and _SURROGATE.search(text):
        raise PreferenceDataError(f"{where}: {what} holds a lone UTF-16 surrogate (a broken \\u escape)")


def _check_response(response: Any, key: str, chat: bool, where: str) -> None:
    if chat and isinstance(response, list):
        # TRL's conversational form: the response is messages, starting with the assistant's turn.
        _check_messages(response, key, where)
        if response[0]["role"] != "assistant":
            raise PreferenceDataError(
                f"{where}: {key!r} starts with role {response[0]['role']!r}; a response must start with 'assistant'"
            )
        if not any(m["content"].strip() for m in response):
            raise PreferenceDataError(f"{where}: {key!r} is empty")
        return
    content = response.get("content") if chat and isinstance(response, dict) else response
    if not isinstance(content, str):
        kinds = "a string, an assistant message dict or a list of messages" if chat else "a string"
        raise PreferenceDataError(f"{where}: {key!r} must be {kinds}, got {type(response).__name__}")
    if not content.strip():
        raise PreferenceDataError(f"{where}: {key!r} is empty")
    if isinstance(response, dict) and response.get("role", "assistant") != "assistant":
        raise PreferenceDataError(f"{where}: {key!r} has role {response['role']!r}; a response must be 'assistant'")
    _check_text(content, repr(key), where)


def _check_messages(messages: list, what: str, where: str) -> None:
    if not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise PreferenceDataError(
            f"{where}: a list {what!r} must be non-empty OpenAI-style messages "
            '[{"role": ..., "content": ...}, ...]'
        )
    for number, message in enumerate(messages, start=1):
        if message["role"] not in MESSAGE_ROLES:
            raise PreferenceDataError(
                f"{where}: {what} message {number} has unknown role {message['role']!r}; "
                f"valid roles: {', '.join(MESSAGE_ROLES)}"
            )
        _check_text(message["content"], f"{what} message {number}", where)


def _is_finite(value: Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def validate_record(record: Any, where: str, field_names: Mapping[str, str] | None = None) -> None:
    """Raise :class:`PreferenceDataError` (prefixed with ``where``) unless ``record`` is a usable pair.

    ``field_names``: the name to show for each record key in messages (the source's own
    field, when a reader mapped it); NeMo Aligner's keys otherwise.
    """
    shown = {key: key for key in (*REQUIRED_KEYS, *REWARD_KEYS)} | dict(field_names or {})
    if not isinstance(record, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [shown[key] for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise PreferenceDataError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    prompt = record["prompt"]
    chat = isinstance(prompt, list)
    if chat:
        _check_messages(prompt, shown["prompt"], where)
    elif isinstance(prompt, str):
        _check_text(prompt, repr(shown["prompt"]), where)
    else:
        raise PreferenceDataError(f"{where}: {shown['prompt']!r} must be a string or a list of messages")
    for key in ("chosen_response", "rejected_response"):
        _check_response(record[key], shown[key], chat, where)
    for key in REWARD_KEYS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
            raise PreferenceDataError(f"{where}: {shown[key]!r} must be a number, got {value!r}")
        if value is not None and not _is_finite(value):
            raise PreferenceDataError(f"{where}: {shown[key]!r} must be finite, got {value!r}")


def record_chars(record: dict) -> int:
    """Characters of text in a validated record: prompt (every message) and both responses."""

    def chars(value: Any) -> int:
        if isinstance(value, list):
            return sum(len(m["content"]) for m in value)
        return len(value["content"] if isinstance(value, dict) else value)

    return sum(chars(record[key]) for key in REQUIRED_KEYS)
