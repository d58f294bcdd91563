"""NeMo Aligner's model loading helpers (``nemo_aligner.utils.utils``) over nemo-dpo's checkpoint readers."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from nemo_dpo.models.nlp.gpt.reference_policy import named_parameters_of_chunks
from nemo_dpo.training.model import load_model_from_source, merge_checkpoint_config, open_checkpoint
from nemo_dpo.utils.train_script_utils import model_state

__all__ = ["load_and_override_model_config", "load_from_nemo", "retrieve_model_state_dict_in_cpu"]


def _tokenizer_path(model_cfg) -> str | None:
    return (model_cfg.get("tokenizer") or {}).get("path")


def load_and_override_model_config(restore_path, model_cfg_to_overwrite: DictConfig,
                                   remove_meta_info: bool = True) -> DictConfig:
    """A copy of ``model_cfg_to_overwrite`` with the checkpoint's architecture merged in.

    ``restore_path``: a nemo-dpo folder, a Hugging Face folder or a ``.nemo`` file
    (null: the embedded default model). Differs from NeMo Aligner: the
    checkpoint's architecture keys win over the given ones (as in ``train(cfg)``:
    weights only fit their own shapes), and there is no other checkpoint config
    to merge, so ``remove_meta_info`` and ``overwrite_base_config`` have nothing to act on.
    """
    merged = OmegaConf.create(OmegaConf.to_container(model_cfg_to_overwrite, resolve=False))
    merge_checkpoint_config(merged, open_checkpoint(restore_path, _tokenizer_path(merged)))
    merged.pop("overwrite_base_config", None)
    return merged


def load_from_nemo(cls, model_cfg: DictConfig, trainer, strict: bool = True, modify_config_fn=None,
                   restore_path=None, load_base_model_only: bool = False, return_updated_cfg: bool = False):
    """``cls`` (``MegatronGPTDPOModel`` or a subclass) with the weights and tokenizer (``.tokenizer``) at ``restore_path``.

    Any checkpoint ``pretrained_checkpoint.restore_from_path`` takes; the
    architecture is merged into ``model_cfg`` in place. Collective: call after
    ``resolve_and_create_trainer``. Differs from NeMo Aligner: weights always load
    strictly (``strict=False`` and ``modify_config_fn`` are refused);
    ``load_base_model_only`` has no effect (checkpoints hold only the base model);
    ``.nemo`` files with pickled objects need ``pretrained_checkpoint.trust_pickled_objects``
    in ``trainer.cfg``.
    """
    if not strict:
        raise NotImplementedError("load_from_nemo(strict=False) is not supported: weights always load strictly")
    if modify_config_fn is not None:
        raise NotImplementedError("load_from_nemo(modify_config_fn=...) is not supported: pass the config to use "
                                  "(see load_and_override_model_config)")
    trust = (trainer.cfg.get("pretrained_checkpoint") or {}).get("trust_pickled_objects", False)
    source = open_checkpoint(restore_path, _tokenizer_path(model_cfg), trust)
    model = load_model_from_source(cls, model_cfg, source)
    model_state(model)["tokenizer_dir"] = source.tokenizer_dir
    return (model, model_cfg) if return_updated_cfg else model


def retrieve_model_state_dict_in_cpu(model, megatron_amp_O2: bool = True) -> dict:
    """A CPU copy of the policy's weights, what ``model.ref_policy_state_dict`` holds (the reference policy).

    ``megatron_amp_O2`` has no effect: the copy is in the layout the model itself uses.
    """
    return {name: weight.detach().to("cpu", copy=True)
            for name, weight in named_parameters_of_chunks(model.model).items()}
