"""The Hugging Face model families nemo-dpo reads and writes, as data.

Each :class:`HFFamily` says how one family's ``config.json`` differs from the
others: its names, where its biases may be, whether it normalises queries and
keys, and how it treats sliding-window attention. Config translation
(:mod:`nemo_dpo.interop.hf.config`) and export consult this table instead of
testing family names, so a new Llama-like family is one more entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture

# Bias layouts a family's config can express.
BIAS_PER_CONFIG = "attention_bias == mlp_bias"  # config keys attention_bias and mlp_bias, both or neither
BIAS_QKV_ONLY = "q/k/v only"  # always biases on q, k, v and nowhere else (Qwen2)
BIAS_NONE = "none"  # no biases in the linear layers (Qwen3 without attention_bias)


@dataclass(frozen=True)
class HFFamily:
    """One family of Llama-like decoder models in Hugging Face ``transformers``."""

    architecture: str  # the config's "architectures" entry
    model_type: str
    bias_layout: str
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (q_norm / k_norm)
    # config.json key of a sliding window we attend past (warned about), or that we refuse when true.
    warned_sliding_window: str | None = None
    refused_sliding_window: str | None = None

    def biases(self, config: dict) -> tuple[bool, bool]:
        """``(bias, qkv_bias)`` of our architecture for this family's ``config.json``."""
        if self.bias_layout == BIAS_QKV_ONLY:
            return False, True
        attention_bias = bool(config.get("attention_bias", False))
        if self.bias_layout == BIAS_NONE:
            if attention_bias:
                raise ValueError(
                    f"{self.architecture} with attention_bias=True is not supported: megatron-core puts "
                    "biases on all linear layers or on none, and this family has none in its MLP"
                )
            return False, False
        mlp_bias = bool(config.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise ValueError(
                f"{self.architecture} with attention_bias={attention_bias} and mlp_bias={mlp_bias} is not "
                "supported: megatron-core puts biases on all linear layers or on none (Qwen2's q/k/v-only aside)"
            )
        return attention_bias, attention_bias

    def expresses(self, arch: GPTArchitecture) -> bool:
        """Whether this family's config can describe ``arch``'s biases and norms."""
        if arch.qk_layernorm != self.qk_norm:
            return False
        if self.bias_layout == BIAS_QKV_ONLY:
            return arch.qkv_bias and not arch.bias
        if self.bias_layout == BIAS_NONE:
            return not arch.qkv_bias and not arch.bias
        return arch.qkv_bias == arch.bias

    def export_settings(self, arch: GPTArchitecture) -> tuple[dict, dict]:
        """config.json keys to set, and keys to set only where absent, for ``arch``."""
        if self.bias_layout == BIAS_PER_CONFIG:
            return dict(attention_bias=arch.bias, mlp_bias=arch.bias), {}
        forced = dict(attention_bias=False) if self.bias_layout == BIAS_NONE else {}
        return forced, {self.refused_sliding_window: False} if self.refused_sliding_window else {}


# In order of preference for a config made from scratch (Llama before Mistral).
FAMILIES = (
    HFFamily("LlamaForCausalLM", "llama", BIAS_PER_CONFIG),
    HFFamily("MistralForCausalLM", "mistral", BIAS_PER_CONFIG, warned_sliding_window="sliding_window"),
    HFFamily("Qwen2ForCausalLM", "qwen2", BIAS_QKV_ONLY, refused_sliding_window="use_sliding_window"),
    HFFamily("Qwen3ForCausalLM", "qwen3", BIAS_NONE, qk_norm=True, refused_sliding_window="use_sliding_window"),
)
SUPPORTED_ARCHITECTURES = {family.architecture: family for family in FAMILIES}


def family_of_config(config: dict) -> HFFamily:
    """The family of a ``config.json`` (by ``architectures``, else ``model_type``), or an error listing ours."""
    names = config.get("architectures") or []
    if not names:
        by_type = {family.model_type: family.architecture for family in FAMILIES}
        names = [by_type.get(config.get("model_type"), f"model_type={config.get('model_type')!r}")]
    name = names[0]
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"Hugging Face architecture {name} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return SUPPORTED_ARCHITECTURES[name]


def family_for_architecture(arch: GPTArchitecture) -> HFFamily:
    """The first family that can express ``arch``, or an error saying why none can."""
    problems = []
    required = dict(normalization="rmsnorm", position_embedding_type="rope", activation="swiglu")
    for key, needed in required.items():
        value = getattr(arch, key)
        if value != needed and not (key == "activation" and value == "fast-swiglu"):
            problems.append(f"{key}={value!r} (needs {needed!r})")
    if float(arch.rotary_percentage) != 1.0:
        problems.append(f"rotary_percentage={arch.rotary_percentage} (needs 1.0)")
    if problems:
        names = "/".join(family.architecture.removesuffix("ForCausalLM") for family in FAMILIES)
        raise ValueError(f"this model cannot be exported as {names}: " + ", ".join(problems))
    for family in FAMILIES:
        if family.expresses(arch):
            return family
    if arch.bias and not arch.qkv_bias:
        raise ValueError("bias=true with qkv_bias=false has no Hugging Face equivalent")
    raise ValueError(
        f"bias={arch.bias}, qkv_bias={arch.qkv_bias} with qk_layernorm={arch.qk_layernorm} has no Hugging Face "
        "equivalent"
    )
