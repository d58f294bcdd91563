"""Preference rows in the layouts users have, read as NeMo Aligner records.

A NeMo Aligner record is ``{"prompt", "chosen_response", "rejected_response"}``
(optional ``chosen_reward``/``rejected_reward``). ``model.data.field_names``
says which field (JSON key, Parquet or ``datasets`` column) holds each of
them. Left at NeMo Aligner's names, a source whose first row lacks
``chosen_response``/``rejected_response`` but has ``chosen``/``rejected`` is read
with Hugging Face TRL's names (:data:`TRL_FIELD_NAMES`), so TRL data needs no
setting. TRL's forms, as rows:

- strings: ``{"prompt": str, "chosen": str, "rejected": str}``, the same as NeMo's string form;
- explicit prompt, conversational: ``prompt`` a list of messages, ``chosen``/``rejected``
  lists of messages starting with the assistant's (rendered with the chat template);
- implicit prompt: no prompt field (or ``field_names.prompt: null``); ``chosen`` and
  ``rejected`` are whole conversations, the prompt is their shared leading messages
  and each response the messages after them, starting with an assistant message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from nemo_dpo.data.records import PreferenceDataError, validate_record

__all__ = ["FieldNames", "NEMO_FIELD_NAMES", "RecordFormat", "TRL_FIELD_NAMES", "split_shared_prompt"]


@dataclass(frozen=True)
class FieldNames:
    """The field holding each part of a record (``model.data.field_names``); ``prompt`` None: implicit."""

    prompt: str | None = "prompt"
    chosen_response: str = "chosen_response"
    rejected_response: str = "rejected_response"
    chosen_reward: str = "chosen_reward"
    rejected_reward: str = "rejected_reward"

    @classmethod
    def from_config(cls, value: Mapping | None) -> "FieldNames":
        """From a ``field_names`` mapping (missing keys keep NeMo Aligner's names); unknown keys are refused."""
        given = dict(value or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise ValueError(f"model.data.field_names: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        for key, name in given.items():
            if not (isinstance(name, str) and name) and not (key == "prompt" and name is None):
                raise ValueError(
                    f"model.data.field_names.{key}={name!r} must be a field name"
                    + (" (or null for an implicit prompt)" if key == "prompt" else "")
                )
        return cls(**given)


NEMO_FIELD_NAMES = FieldNames()
TRL_FIELD_NAMES = FieldNames(chosen_response="chosen", rejected_response="rejected")


def split_shared_prompt(chosen: list, rejected: list, where: str) -> tuple[list, list, list]:
    """``(prompt, chosen response, rejected response)`` of two conversations sharing their leading messages.

    The prompt is every message up to the first that differs; both responses must
    start there with an assistant message. Two equal conversations keep their last
    message as the response (the dataset then drops the pair as identical).
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if 0 < shared == len(chosen) == len(rejected):
        shared -= 1
    for key, conversation in (("chosen", chosen), ("rejected", rejected)):
        if shared == len(conversation):
            raise PreferenceDataError(
                f"{where}: {key!r} has no messages after the {shared} it shares with the other conversation"
            )
        role = conversation[shared].get("role") if isinstance(conversation[shared], dict) else None
        if shared == 0 or role != "assistant":
            raise PreferenceDataError(
                f"{where}: an implicit prompt needs 'chosen' and 'rejected' to share their leading messages and "
                f"differ first at an assistant message; they differ at message {shared + 1}, {key!r}'s is "
                f"{'role ' + repr(role) if role else 'not a message'}"
            )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


class RecordFormat:
    """Turns the rows of one source into NeMo Aligner records; TRL's names are detected on the first row.

    ``field_names`` other than NeMo Aligner's are used as given, with no detection.
    ``detected`` says which names the source was read with (None before its first row).
    """

    def __init__(self, field_names: FieldNames = NEMO_FIELD_NAMES):
        self.field_names = field_names
        self.detected: FieldNames | None = None if field_names == NEMO_FIELD_NAMES else field_names

    def _detect(self, row: dict) -> FieldNames:
        nemo = NEMO_FIELD_NAMES
        if nemo.chosen_response not in row and nemo.rejected_response not in row and (
                TRL_FIELD_NAMES.chosen_response in row and TRL_FIELD_NAMES.rejected_response in row):
            return TRL_FIELD_NAMES
        return nemo

    def to_record(self, row: Any, where: str) -> dict:
        """The checked NeMo Aligner record of ``row``; errors name ``where`` and the source's own field names."""
        if not isinstance(row, dict):
            raise PreferenceDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if self.detected is None:
            self.detected = self._detect(row)
        names = self.detected
        if names == NEMO_FIELD_NAMES:
            validate_record(row, where)
            return row  # already NeMo Aligner's record
        chosen, rejected = row.get(names.chosen_response), row.get(names.rejected_response)
        prompt = None if names.prompt is None else row.get(names.prompt)
        implicit = prompt is None and _is_messages(chosen) and _is_messages(rejected)
        missing = [name for name in (names.prompt, names.chosen_response, names.rejected_response)
                   if name is not None and name not in row and not (name == names.prompt and implicit)]
        if missing:
            raise PreferenceDataError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
        if isinstance(prompt, str) and (_is_messages(chosen) or _is_messages(rejected)):
            raise PreferenceDataError(
                f"{where}: {names.prompt!r} is a string but the responses are message lists: give the prompt as "
                "messages, or set model.data.field_names.prompt=null to take it from their shared leading messages"
            )
        if implicit:
            prompt, chosen, rejected = split_shared_prompt(chosen, rejected, where)
        elif names.prompt is None:
            raise PreferenceDataError(
                f"{where}: model.data.field_names.prompt is null (an implicit prompt), which needs "
                f"{names.chosen_response!r} and {names.rejected_response!r} as message lists"
            )
        record = {"prompt": prompt, "chosen_response": chosen, "rejected_response": rejected}
        for key in ("chosen_reward", "rejected_reward"):
            value = row.get(getattr(names, key))
            if value is not None:
                record[key] = value
        shown = asdict(names)
        if implicit:
            shown["prompt"] = "prompt (the messages chosen and rejected share)"
        validate_record(record, where, shown)
        return record

    def describe(self) -> str:
        """The detected names as ``key=field`` pairs, for a log line."""
        return ", ".join(f"{key}={name}" for key, name in asdict(self.detected or self.field_names).items())
