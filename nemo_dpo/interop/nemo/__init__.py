"""NeMo 1.0 ``.nemo`` checkpoints of megatron-core GPT models (``mcore_gpt: true``), read at any TP/PP."""

from nemo_dpo.interop.nemo.archive import extract_nemo_archive, read_nemo_config
from nemo_dpo.interop.nemo.config import architecture_from_nemo_config
from nemo_dpo.interop.nemo.reader import NemoReader
from nemo_dpo.interop.nemo.weights import load_nemo_weights

__all__ = ["NemoReader", "architecture_from_nemo_config", "extract_nemo_archive", "load_nemo_weights",
           "read_nemo_config"]
