"""Preference pairs: NeMo Aligner's ``DPOModelDataset`` format and item layout.

Each record is ``{"prompt": ..., "chosen_response": ..., "rejected_response": ...}``
with optional ``chosen_reward``/``rejected_reward`` (used by RPO losses). The prompt is
either already formatted text (e.g. NeMo's ``<extra_id_0>System\\n\\n<extra_id_1>User\\n...``
template) or a list of OpenAI-style messages rendered with the tokenizer's chat template.
Records come from JSONL, Parquet or a ``datasets`` folder, in NeMo Aligner's or
Hugging Face TRL's layout (:mod:`nemo_dpo.data.sources`, :mod:`nemo_dpo.data.formats`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from nemo_dpo.data.formats import FieldNames, RecordFormat
from nemo_dpo.data.jsonl import JsonlRecords, load_jsonl
from nemo_dpo.data.records import LocatedRecords, PreferenceDataError, record_chars, validate_record
from nemo_dpo.data.sources import load_preference_records

__all__ = [
    "DPOModelDataset",
    "JsonlRecords",
    "OVER_LENGTH_POLICIES",
    "PreferenceDataError",
    "load_jsonl",
    "validate_record",
]

logger = logging.getLogger(__name__)

OVER_LENGTH_POLICIES = ("drop", "truncate_response")
# Default cfg.data.max_record_chars per token of seq_length. Text averages about 4
# characters per BPE token and real vocabularies' longest tokens are a few dozen
# characters; a JSON line also carries escapes (6 characters for one \uXXXX) and both
# responses. A line longer than this cannot fit seq_length tokens unless its tokens
# average over 64 characters (say, a vocabulary with very long whitespace runs): raise
# max_record_chars for such a tokenizer.
CHARS_PER_TOKEN = 64
# Records formatted and tokenised together: the Rust tokenizer parallelises a batch,
# and memory stays bounded by the batch, not the file.
TOKENIZE_BATCH = 1024


class DPOModelDataset(Dataset):
    """Tokenised chosen/rejected pairs with NeMo Aligner's constructor and item layout.

    Items hold ``chosen``/``rejected`` (prompt + response ids, both padded with eos to
    the longer of the two), ``chosen_length``/``rejected_length`` (unpadded),
    ``chosen_labels``/``rejected_labels`` (the ids with -100 on prompt and padding
    positions) and ``chosen_reward``/``rejected_reward``.

    ``data`` is a list of records; when None it is read from ``data_prefix``, a JSONL or
    Parquet file or a ``datasets`` folder (:func:`~nemo_dpo.data.sources.load_preference_records`).
    ``documents`` selects record indices (all when None). ``seed`` and ``drop_last`` are
    kept for API parity: shuffling and batching are the samplers' job.

    ``cfg.data`` keys: ``append_eod`` (append eos to each response; default False, as in
    NeMo Aligner), ``default_chosen_reward`` (1.0), ``default_rejected_reward`` (0.0),
    ``over_length_policy``: pairs longer than ``seq_length`` are dropped (``drop``, the
    default) or, with ``truncate_response``, have their responses cut to fit when at least
    one response token remains (else dropped). ``num_dropped`` and ``num_truncated``
    count them. Pairs whose chosen and rejected ids are equal (before or after that
    truncation) carry no preference and are dropped (``num_identical``). ``max_record_chars``
    (None: 64 characters per token of ``seq_length``) bounds a record's length: longer
    file lines are skipped unparsed, longer records untokenised (``num_too_long``).
    ``field_names`` maps the fields of the data to NeMo Aligner's record keys (default:
    NeMo Aligner's names, with Hugging Face TRL's ``prompt``/``chosen``/``rejected``
    detected; see :mod:`nemo_dpo.data.formats`); it applies to ``data`` given in memory too.
    ``indices`` maps each dataset index to its record index.
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
        max_chars = data_cfg.get("max_record_chars")
        if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
            raise ValueError(f"cfg.data.max_record_chars must be a positive integer or null, got {max_chars!r}")
        self.max_record_chars = CHARS_PER_TOKEN * seq_length if max_chars is None else max_chars

        field_names = FieldNames.from_config(data_cfg.get("field_names"))
        if data is None:
            self.data = load_preference_records(data_prefix, name, self.max_record_chars, field_names)
        elif isinstance(data, LocatedRecords):
            self.data = data  # already read (and mapped) by a reader
        else:
            record_format = RecordFormat(field_names)
            self.data = LocatedRecords(
                [record_format.to_record(row, f"{name}, record {i}") for i, row in enumerate(data)], name
            )
        documents = np.arange(len(self.data)) if documents is None else np.asarray(documents)
        if not len(documents):
            raise PreferenceDataError(f"{name}: no records")
        if documents.min() < 0 or documents.max() >= len(self.data):
            raise IndexError(f"{name}: documents must index the {len(self.data)} records")
        for i in documents:
            validate_record(self.data[i], self._where(i))
        self._tokenize(documents)

    def _where(self, index: int) -> str:
        return self.data.where(index)

    def _response_text(self, messages: list[dict], prompt_text: str, response: Any, where: str) -> str:
        if isinstance(response, str):
            response = {"role": "assistant", "content": response}
        # One assistant message (NeMo Aligner) or a list of messages (TRL's conversational form).
        full = self.tokenizer.apply_chat_template(messages + (response if isinstance(response, list) else [response]))
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
        self.indices: list[int] = []  # record index of each usable pair: the dataset's index mapping
        self._pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # int32 saves memory
        self.num_dropped = self.num_truncated = self.num_identical = 0
        # Lines the reader skipped unparsed, then in-memory records over the same bound.
        skipped_lines = getattr(self.data, "too_long_lines", [])
        first_too_long = f"{self.data.path}:{skipped_lines[0]}" if skipped_lines else None
        self.num_too_long = len(skipped_lines)
        fitting = []
        for i in map(int, documents):
            if record_chars(self.data[i]) > self.max_record_chars:
                self.num_too_long += 1
                first_too_long = first_too_long or self._where(i)
            else:
                fitting.append(i)
        self._unk_id, self.num_unknown, self._first_unknown = getattr(self.tokenizer, "unk_id", None), 0, None
        for start in range(0, len(fitting), TOKENIZE_BATCH):
            batch = fitting[start : start + TOKENIZE_BATCH]
            # Prompt and responses are tokenised separately and concatenated: tokenising the
            # joined text lets BPE merge across the boundary and move the prompt/response
            # split, which would put loss on prompt text or hide response text from it.
            texts = [self._format(i) for i in batch]
            columns = (self.tokenizer.batch_text_to_ids(column) for column in zip(*texts))
            for i, prompt, chosen, rejected in zip(batch, *columns):
                self._add_pair(i, prompt, chosen, rejected)
        self._report(len(documents) + len(skipped_lines), first_too_long)

    def _add_pair(self, i: int, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
        for key, ids in (("chosen_response", chosen), ("rejected_response", rejected)):
            if not ids:
                raise PreferenceDataError(f"{self._where(i)}: {key!r} tokenizes to no tokens")
        if self._unk_id is not None:
            unknown = prompt.count(self._unk_id) + chosen.count(self._unk_id) + rejected.count(self._unk_id)
            if unknown and self._first_unknown is None:
                self._first_unknown = self._where(i)
            self.num_unknown += unknown
        eod = [self.eos_id] if self.append_eod else []
        chosen, rejected = chosen + eod, rejected + eod
        if chosen == rejected:
            self.num_identical += 1
            return
        if len(prompt) + max(len(chosen), len(rejected)) > self.seq_length:
            room = self.seq_length - len(prompt)
            # Truncation must leave at least one response token, or the pair carries no signal.
            if self.over_length_policy != "truncate_response" or room < 1:
                self.num_dropped += 1
                return
            chosen, rejected = chosen[:room], rejected[:room]
            if chosen == rejected:  # the responses differed only past the cut
                self.num_identical += 1
                return
            self.num_truncated += 1
        self.indices.append(i)
        self._pairs.append(tuple(np.asarray(ids, dtype=np.int32) for ids in (prompt, chosen, rejected)))

    def _report(self, num_records: int, first_too_long: str | None) -> None:
        """One warning line for every pair not used as given, and one for unknown characters."""
        parts = []
        if self.num_dropped or self.num_truncated:
            parts.append(
                f"{self.num_dropped + self.num_truncated} exceed seq_length={self.seq_length}: "
                f"{self.num_dropped} dropped, {self.num_truncated} truncated "
                f"(cfg.data.over_length_policy={self.over_length_policy})"
            )
        if self.num_identical:
            parts.append(f"{self.num_identical} dropped for identical chosen and rejected tokens")
        if self.num_too_long:
            parts.append(
                f"{self.num_too_long} skipped for exceeding cfg.data.max_record_chars={self.max_record_chars} "
                f"(first at {first_too_long})"
            )
        if parts:
            logger.warning("%s: of %d preference pairs, %s", self.name, num_records, "; ".join(parts))
        if self.num_unknown:
            logger.warning(
                "%s: %d token(s) of text the tokenizer cannot represent became its unknown token (first at %s)",
                self.name,
                self.num_unknown,
                self._first_unknown,
            )
        if not self._pairs:
            reasons = "; ".join(parts) or "none given"
            raise PreferenceDataError(f"{self.name}: no usable preference pairs of {num_records}: {reasons}")

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
