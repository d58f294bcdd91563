"""Hugging Face checkpoints of Llama-like families (see :data:`FAMILIES`) in and out of our models."""

from nemo_dpo.interop.hf.config import (
    SOURCE_CONFIG_NAME,
    architecture_from_hf_config,
    hf_config_from_architecture,
    read_hf_config,
)
from nemo_dpo.interop.hf.export import export_hf
from nemo_dpo.interop.hf.families import FAMILIES, HFFamily
from nemo_dpo.interop.hf.reader import HuggingFaceReader
from nemo_dpo.interop.hf.safetensors_reader import SafetensorsFolder, load_hf_weights
from nemo_dpo.interop.hf.tensor_map import HFTensorMap

__all__ = [
    "FAMILIES", "HFFamily", "HFTensorMap", "HuggingFaceReader", "SOURCE_CONFIG_NAME", "SafetensorsFolder",
    "architecture_from_hf_config", "export_hf", "hf_config_from_architecture", "load_hf_weights", "read_hf_config",
]
