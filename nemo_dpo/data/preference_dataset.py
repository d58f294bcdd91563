"""Preference pairs from JSONL: NeMo Aligner's ``DPOModelDataset`` format and item layout.

Each JSONL line is ``{"prompt": ..., "chosen_response": ..., "rejected_response": ...}``
with optional ``chosen_reward``/``rejected_reward`` (used by RPO losses). The prompt is
either already formatted text (e.g. NeMo's ``<extra_id_0>System\\n\\n<extra_id_1>User\\n...``
template) or a list of OpenAI-style messages rendered with the tokenizer's chat template.
"""

from __future__ import annotations

import json
import logging
from numbers import Real
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DPOModelDataset",
    "JsonlRecords",
    "OVER_LENGTH_POLICIES",
    "PreferenceDataError",
    "load_jsonl",
    "validate_record",
]

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("prompt", "chosen_response", "rejected_response")
OVER_LENGTH_POLICIES = ("drop", "truncate_response")


class PreferenceDataError(ValueError):
    """A preference record that cannot be used; the message names its file and line."""


class JsonlRecords(list):
    """Records of one JSONL file that remember where each came from, for error messages."""

    def __init__(self, records: list[dict], path: str | Path, line_numbers: list[int]):
        super().__init__(records)
        self.path = str(path)
        self.line_numbers = line_numbers

    def where(self, index: int) -> str:
        return f"{self.path}:{self.line_numbers[index]}"


def _check_response(response: Any, key: str, chat: bool, where: str) -> None:
    content = response.get("content") if chat and isinstance(response, dict) else response
    if not isinstance(content, str):
        kinds = "a string or an assistant message dict" if chat else "a string"
        raise PreferenceDataError(f"{where}: {key!r} must be {kinds}, got {type(response).__name__}")
    if not content.strip():
        raise PreferenceDataError(f"{where}: {key!r} is empty")


def validate_record(record: Any, where: str) -> None:
    """Raise :class:`PreferenceDataError` (prefixed with ``where``) unless ``record`` is a usable pair."""
    if not isinstance(record, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise PreferenceDataError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    prompt = record["prompt"]
    chat = isinstance(prompt, list)
    if chat:
        if not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        ):
            raise PreferenceDataError(
                f"{where}: a list 'prompt' must be non-empty OpenAI-style messages "
                '[{"role": ..., "content": ...}, ...]'
            )
    elif not isinstance(prompt, str):
        raise PreferenceDataError(f"{where}: 'prompt' must be a string or a list of messages")
    for key in ("chosen_response", "rejected_response"):
        _check_response(record[key], key, chat, where)
    for key in ("chosen_reward", "rejected_reward"):
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
            raise PreferenceDataError(f"{where}: {key!r} must be a number, got {value!r}")


def load_jsonl(path: str | Path) -> JsonlRecords:
    """Read and validate a preference JSONL file; blank lines are skipped.

    Errors name the file and the 1-based line: malformed JSON, missing keys, empty responses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference data file not found: {path}")
    records, line_numbers = [], []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PreferenceDataError(
                    f"{path}:{line_number}: malformed JSON ({err.msg}, column {err.colno})"
                ) from None
            validate_record(record, f"{path}:{line_number}")
            records.append(record)
            line_numbers.append(line_number)
    if not records:
        raise PreferenceDataError(f"{path}: no records")
    return JsonlRecords(records, path, line_numbers)


class DPOModelDataset(Dataset):
    """Tokenised chosen/rejected pairs with NeMo Aligner's constructor and item layout.

    Items hold ``chosen``/``rejected`` (prompt + response ids, both padded with eos to
    the longer of the two), ``chosen_length``/``rejected_length`` (unpadded),
    ``chosen_labels``/``rejected_labels`` (the ids with -100 on prompt and padding
    positions) and ``chosen_reward``/``rejected_reward``.

    ``data`` is a list of records; when None it is read with :func:`load_jsonl` from
    ``data_prefix``. ``documents`` selects record indices (all when None). ``seed`` and
    ``drop_last`` are kept for API parity: shuffling and batching are the samplers' job.

    ``cfg.data`` keys: ``append_eod`` (append eos to each response; default False, as in
    NeMo Aligner), ``default_chosen_reward`` (1.0), ``default_rejected_reward`` (0.0),
    ``over_length_policy``: pairs longer than ``seq_length`` are dropped (``drop``, the
    default) or, with ``truncate_response``, have their responses cut to fit when at least
    one response token remains (else dropped). ``num_dropped`` and ``num_truncated``
    count them; ``indices`` maps each dataset index to its record index.
    """

    def __init__(
        self,
        cfg,
        tokenizer,
        name: str,
        data_prefix: str | Path | None,
        documents: Sequence[int] | None,
        data: Sequence[dict] | None,
        seq_length: int,
        seed: int,
        drop_last: bool = True,
        pad_chosen_rejected_to_max: bool = True,
    ):
        super().__init__()
        data_cfg = (cfg.get("data") if cfg is not None else None) or {}
        self.cfg = cfg
        self.name = name
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.seed = seed
        self.drop_last = drop_last
        self.pad_chosen_rejected_to_max = pad_chosen_rejected_to_max
        self.eos_id = tokenizer.eos_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token: DPO pads and terminates sequences with eos")
        self.append_eod = bool(data_cfg.get("append_eod", False))
        self.default_chosen_reward = float(data_cfg.get("default_chosen_reward", 1.0))
        self.default_rejected_reward = float(data_cfg.get("default_rejected_reward", 0.0))
        self.over_length_policy = data_cfg.get("over_length_policy", "drop")
        if self.over_length_policy not in OVER_LENGTH_POLICIES:
            raise ValueError(
                f"cfg.data.over_length_policy must be one of {OVER_LENGTH_POLICIES}, "
                f"got {self.over_length_policy!r}"
            )

        self.data = load_jsonl(data_prefix) if data is None else data
        documents = np.arange(len(self.data)) if documents is None else np.asarray(documents)
        if not len(documents):
            raise PreferenceDataError(f"{name}: no records")
        if documents.min() < 0 or documents.max() >= len(self.data):
            raise IndexError(f"{name}: documents must index the {len(self.data)} records")
        for i in documents:
            validate_record(self.data[i], self._where(i))
        self._tokenize(documents)

    def _where(self, index: int) -> str:
        if isinstance(self.data, JsonlRecords):
            return self.data.where(index)
        return f"{self.name}, record {index}"

    def _response_text(self, messages: list[dict], prompt_text: str, response: Any, where: str) -> str:
        if isinstance(response, str):
            response = {"role": "assistant", "content": response}
        full = self.tokenizer.apply_chat_template(messages + [response])
        # The response is whatever the template adds after the generation prompt
        # (its text plus the template's end-of-turn markers).
        if not full.startswith(prompt_text):
            raise PreferenceDataError(
                f"{where}: the chat template does not render the prompt (with the generation prompt) "
                "as a prefix of prompt + response, so the response cannot be split off"
            )
        return full[len(prompt_text) :]

    def _format(self, index: int) -> tuple[str, str, str]:
        record, where = self.data[index], self._where(index)
        prompt = record["prompt"]
        if isinstance(prompt, str):
            return prompt, record["chosen_response"], record["rejected_response"]
        try:
            prompt_text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            return (
                prompt_text,
                self._response_text(prompt, prompt_text, record["chosen_response"], where),
                self._response_text(prompt, prompt_text, record["rejected_response"], where),
            )
        except PreferenceDataError:
            raise
        except Exception as err:
            raise PreferenceDataError(f"{where}: cannot render the chat template: {err}") from err

    def _tokenize(self, documents: np.ndarray) -> None:
        # Prompt and responses are tokenised separately and concatenated: tokenising the
        # joined text lets BPE merge across the boundary and move the prompt/response
        # split, which would put loss on prompt text or hide response text from it.
        texts = [self._format(int(i)) for i in documents]
        prompts, chosens, rejecteds = (self.tokenizer.batch_text_to_ids(column) for column in zip(*texts))
        eod = [self.eos_id] if self.append_eod else []
        self.indices: list[int] = []  # record index of each usable pair: the dataset's index mapping
        self._pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # int32 saves memory
        self.num_dropped = self.num_truncated = 0
        for i, prompt, chosen, rejected in zip(documents, prompts, chosens, rejecteds):
            for key, ids in (("chosen_response", chosen), ("rejected_response", rejected)):
                if not ids:
                    raise PreferenceDataError(f"{self._where(int(i))}: {key!r} tokenizes to no tokens")
            chosen, rejected = chosen + eod, rejected + eod
            if len(prompt) + max(len(chosen), len(rejected)) > self.seq_length:
                room = self.seq_length - len(prompt)
                # Truncation must leave at least one response token, or the pair carries no signal.
                if self.over_length_policy == "truncate_response" and room >= 1:
                    chosen, rejected = chosen[:room], rejected[:room]
                    self.num_truncated += 1
                else:
                    self.num_dropped += 1
                    continue
            self.indices.append(int(i))
            self._pairs.append(tuple(np.asarray(ids, dtype=np.int32) for ids in (prompt, chosen, rejected)))
        if self.num_dropped or self.num_truncated:
            logger.warning(
                "%s: %d of %d preference pairs exceed seq_length=%d: %d dropped, %d truncated "
                "(cfg.data.over_length_policy=%s)",
                self.name,
                self.num_dropped + self.num_truncated,
                len(documents),
                self.seq_length,
                self.num_dropped,
                self.num_truncated,
                self.over_length_policy,
            )
        if not self._pairs:
            raise PreferenceDataError(
                f"{self.name}: no usable preference pairs (all exceed seq_length={self.seq_length})"
            )

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if idx < 0:
            # Samplers mark padding with -1; a plain list lookup would quietly return the last pair.
            raise IndexError(f"{self.name}: index {idx} < 0 (padding markers are handled by build_dataloader)")
        prompt, chosen_response, rejected_response = self._pairs[idx]
        record = self.data[self.indices[idx]]
        chosen = np.concatenate([prompt, chosen_response]).astype(np.int64)
        rejected = np.concatenate([prompt, rejected_response]).astype(np.int64)
        width = max(len(chosen), len(rejected)) if self.pad_chosen_rejected_to_max else None

        def tokens_and_labels(ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            labels = ids.copy()
            labels[: len(prompt)] = -100
            pad = (width or len(ids)) - len(ids)
            return (
                torch.from_numpy(np.pad(ids, (0, pad), constant_values=self.eos_id)),
                torch.from_numpy(np.pad(labels, (0, pad), constant_values=-100)),
            )

        chosen_tokens, chosen_labels = tokens_and_labels(chosen)
        rejected_tokens, rejected_labels = tokens_and_labels(rejected)
        chosen_reward = record.get("chosen_reward")
        rejected_reward = record.get("rejected_reward")
        return {
            "chosen": chosen_tokens,
            "rejected": rejected_tokens,
            "chosen_length": len(chosen),
            "rejected_length": len(rejected),
            "chosen_labels": chosen_labels,
            "rejected_labels": rejected_labels,
            "chosen_reward": self.default_chosen_reward if chosen_reward is None else float(chosen_reward),
            "rejected_reward": self.default_rejected_reward if rejected_reward is None else float(rejected_reward),
        }
