"""nemo-dpo: preference alignment of GPT models on megatron-core."""

__version__ = "0.1.0.dev0"
