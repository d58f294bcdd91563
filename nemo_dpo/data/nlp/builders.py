"""NeMo Aligner's DPO data builders (``nemo_aligner.data.nlp.builders``) with their signatures.

They are adapters over nemo-dpo's own builders (:mod:`nemo_dpo.training.data`),
so every ``data_prefix`` form and ``data_impl`` those accept works here, with the
same checks and messages.
"""

from __future__ import annotations

from types import SimpleNamespace

from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_dpo.data.samplers import MegatronPretrainingBatchSampler, MegatronPretrainingRandomBatchSampler
from nemo_dpo.data.samplers import build_dataloader as build_megatron_dataloader
from nemo_dpo.data.samplers import identity_collate
from nemo_dpo.training.data import _sampler_args, build_dataset, check_data_impl

__all__ = [
    "build_dataloader",
    "build_train_valid_test_dpo_datasets",
    "build_train_valid_test_dpo_packed_datasets",
    "identity_collate",
]


def build_train_valid_test_dpo_datasets(cfg, data_prefix, data_impl, splits_string, train_valid_test_num_samples,
                                        seq_length, seed, tokenizer, n_chunks=None, n_examples_per_chunk=None):
    """``(train, validation, test)`` datasets of ``data_prefix``; ``None`` for a split without data.

    ``cfg`` is the model config (``cfg.model``). Differences from NeMo Aligner:
    every split uses its whole file (``train_valid_test_num_samples`` may only
    ask for that: negative or null entries, as NeMo Aligner's example passes),
    chunked JSONL (``n_chunks``, ``n_examples_per_chunk``) is not supported, and
    without a training file train and validation are the embedded default data.
    With ``data_impl="packed_jsonl"`` the files are packed ``.npy`` files and the
    datasets :class:`~nemo_dpo.data.DPOPackedDataset` (items are pairs).
    """
    wanted = [n for n in train_valid_test_num_samples or [] if n is not None and n >= 0]
    if wanted:
        raise NotImplementedError(f"train_valid_test_num_samples={list(train_valid_test_num_samples)}: only whole "
                                  "datasets are supported (pass negative numbers, e.g. -global_batch_size)")
    if n_chunks is not None or n_examples_per_chunk is not None:
        raise NotImplementedError("chunked JSONL data (n_chunks, n_examples_per_chunk) is not supported")
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(model_cfg):
        model_cfg.data.update(data_prefix=data_prefix, data_impl=data_impl, splits_string=splits_string,
                              seq_length=seq_length)
        model_cfg.seed = seed
    check_data_impl(model_cfg.data)
    return tuple(build_dataset(model_cfg, tokenizer, split) for split in ("train", "validation", "test"))


def build_train_valid_test_dpo_packed_datasets(cfg, data_prefix, data_impl, splits_string,
                                               train_valid_test_num_samples, seq_length, seed, tokenizer):
    """Packed DPO datasets (:class:`~nemo_dpo.data.DPOPackedDataset`) of NeMo Aligner's ``.npy`` files.

    ``data_impl`` must be ``packed_jsonl``. Their items are pairs, so
    ``global_batch_size`` counts pairs (NeMo Aligner's counts packs); use
    ``train_ds.global_collate_fn`` (or ``dpo_custom_collate``) as DPOTrainer's ``collate_fn``.
    """
    if data_impl != "packed_jsonl":
        raise ValueError(
            f"build_train_valid_test_dpo_packed_datasets needs data_impl='packed_jsonl', got {data_impl!r}")
    return build_train_valid_test_dpo_datasets(cfg, data_prefix, data_impl, splits_string,
                                               train_valid_test_num_samples, seq_length, seed, tokenizer)


def build_dataloader(cfg: DictConfig, dataset, consumed_samples: int, mbs: int, gbs: int, drop_last: bool = True,
                     pad_samples_to_global_batch_size: bool = False, collate_fn=None, load_gbs: bool = True,
                     use_random_sampler: bool = True):
    """A loader of global batches of ``dataset`` for this data-parallel rank (``cfg`` is the whole run config).

    ``use_random_sampler``: shuffled per epoch from ``cfg.model.seed`` (training),
    else in file order. Differences from NeMo Aligner: ``load_gbs`` must be True
    (DPOTrainer takes whole global batches), and a kept incomplete last batch
    (``drop_last=False``) is always filled up to ``gbs`` with masked copies that
    no loss or metric counts, whatever ``pad_samples_to_global_batch_size`` says,
    so the pairs that count are the same. Memory is not pinned.
    """
    if not load_gbs:
        raise NotImplementedError("build_dataloader(load_gbs=False) is not supported: DPOTrainer takes global batches")
    args = _sampler_args(SimpleNamespace(micro_batch_size=mbs, global_batch_size=gbs), dataset, consumed_samples)
    if use_random_sampler:
        sampler = MegatronPretrainingRandomBatchSampler(**args, drop_last=drop_last, seed=cfg.model.seed)
    else:
        sampler = MegatronPretrainingBatchSampler(**args, drop_last=drop_last)
    return build_megatron_dataloader(dataset, sampler, collate_fn=collate_fn, num_workers=cfg.model.data.num_workers)
