"""NeMo Aligner's ``nemo_aligner.data.nlp.datasets`` names for DPO."""

from __future__ import annotations

from nemo_dpo.data.preference_dataset import DPOModelDataset

__all__ = ["DPOModelDataset", "DPOPackedDataset", "PACKED_NOT_SUPPORTED"]

PACKED_NOT_SUPPORTED = ("packed DPO data (model.data.data_impl=packed_jsonl) is not supported yet; "
                        "give the JSONL preference pairs with data_impl=jsonl")


class DPOPackedDataset:
    """NeMo Aligner's packed DPO dataset: refused until packing lands."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(PACKED_NOT_SUPPORTED)
