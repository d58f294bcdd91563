"""NeMo Aligner's ``nemo_aligner.data.nlp.datasets`` names for DPO."""

from __future__ import annotations

from nemo_dpo.data.packed_npy import DPOPackedDataset
from nemo_dpo.data.preference_dataset import DPOModelDataset

__all__ = ["DPOModelDataset", "DPOPackedDataset"]
