"""Preference data: tokenizer, JSONL dataset, data_prefix blends, DPO collate and Megatron-style samplers."""

from nemo_dpo.data.blending import DATA_PREFIX_KEY, BlendedDataset, DataPrefixError, split_data_prefix
from nemo_dpo.data.collate import document_position_ids, dpo_custom_collate
from nemo_dpo.data.packed_npy import DPOPackedDataset, PackedDataError
from nemo_dpo.data.jsonl import JsonlRecords, load_jsonl
from nemo_dpo.data.preference_dataset import DPOModelDataset
from nemo_dpo.data.records import MESSAGE_ROLES, PreferenceDataError, validate_record
from nemo_dpo.data.samplers import (
    PAD_INDEX,
    MegatronPretrainingBatchSampler,
    MegatronPretrainingRandomBatchSampler,
    build_dataloader,
    identity_collate,
)
from nemo_dpo.data.tokenizer import HFTokenizer, load_tokenizer

__all__ = [
    "BlendedDataset",
    "DATA_PREFIX_KEY",
    "DataPrefixError",
    "DPOModelDataset",
    "DPOPackedDataset",
    "HFTokenizer",
    "JsonlRecords",
    "MESSAGE_ROLES",
    "MegatronPretrainingBatchSampler",
    "MegatronPretrainingRandomBatchSampler",
    "PAD_INDEX",
    "PackedDataError",
    "PreferenceDataError",
    "build_dataloader",
    "document_position_ids",
    "dpo_custom_collate",
    "identity_collate",
    "load_jsonl",
    "load_tokenizer",
    "split_data_prefix",
    "validate_record",
]
