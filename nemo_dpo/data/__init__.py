"""Preference data: tokenizer, JSONL/Parquet/datasets readers (NeMo Aligner's and TRL's layouts), data_prefix
blends, DPO collate and Megatron-style samplers."""

from nemo_dpo.data.blending import DATA_PREFIX_KEY, BlendedDataset, DataPrefixError, split_data_prefix
from nemo_dpo.data.collate import document_position_ids, dpo_custom_collate
from nemo_dpo.data.formats import FieldNames, RecordFormat
from nemo_dpo.data.packed_npy import DPOPackedDataset, PackedDataError
from nemo_dpo.data.jsonl import JsonlRecords, load_jsonl
from nemo_dpo.data.preference_dataset import DPOModelDataset
from nemo_dpo.data.records import MESSAGE_ROLES, LocatedRecords, PreferenceDataError, validate_record
from nemo_dpo.data.samplers import (
    PAD_INDEX,
    MegatronPretrainingBatchSampler,
    MegatronPretrainingRandomBatchSampler,
    build_dataloader,
    identity_collate,
)
from nemo_dpo.data.sources import load_preference_records
from nemo_dpo.data.tables import TableRecords
from nemo_dpo.data.tokenizer import HFTokenizer, load_tokenizer

__all__ = [
    "BlendedDataset",
    "DATA_PREFIX_KEY",
    "DataPrefixError",
    "DPOModelDataset",
    "DPOPackedDataset",
    "FieldNames",
    "HFTokenizer",
    "JsonlRecords",
    "LocatedRecords",
    "MESSAGE_ROLES",
    "MegatronPretrainingBatchSampler",
    "MegatronPretrainingRandomBatchSampler",
    "PAD_INDEX",
    "PackedDataError",
    "PreferenceDataError",
    "RecordFormat",
    "TableRecords",
    "build_dataloader",
    "document_position_ids",
    "dpo_custom_collate",
    "identity_collate",
    "load_jsonl",
    "load_preference_records",
    "load_tokenizer",
    "split_data_prefix",
    "validate_record",
]
