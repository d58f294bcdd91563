"""DPOTrainer: the DPO training loop (epochs, validation, checkpoints), with NeMo Aligner's API."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import Any, Protocol

import torch
from megatron.core import parallel_state
from tqdm import tqdm

from nemo_dpo.data.collate import dpo_custom_collate
from nemo_dpo.optim.torch_optimizer import step_torch_optimizer
from nemo_dpo.parallel.collectives import all_gather_objects, all_reduce, barrier, is_rank0

__all__ = ["DPOTrainer", "NonFiniteLossError", "compute_max_steps", "dpo_custom_collate"]

log = logging.getLogger(__name__)


class DistributedCollateFunction(Protocol):
    def __call__(self, batch: list[dict], **kwargs: Any) -> dict[str, torch.Tensor]: ...


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN or infinite loss or gradient norm."""


def _limit_batches(num_batches: int, limit) -> int:
    """``limit_*_batches``: an int caps the count, a float in [0, 1] takes that fraction."""
    if isinstance(limit, float):
        if not 0.0 <= limit <= 1.0:
            raise ValueError(f"a fractional batch limit must lie in [0, 1], got {limit}")
        return int(num_batches * limit)
    return min(num_batches, int(limit))


def _drop_sampler_padding(batch: dict) -> dict:
    """Remove the pairs a validation sampler added to fill its last global batch.

    They are never computed, so they cannot leak into a loss or metric.
    """
    mask = batch.get("sample_mask")
    if mask is None or bool(mask.all()):
        return batch
    keep = mask > 0
    pairs = mask.shape[0]
    return {key: value[keep] if torch.is_tensor(value) and value.shape[:1] == (pairs,) else value
            for key, value in batch.items()}


def sampler_steps_per_epoch(batch_sampler) -> int:
    """Global batches in an epoch: the sampler's ``steps_per_epoch``, or for a NeMo-style
    sampler (``total_samples``, ``global_batch_size``, ``drop_last``) the count NeMo's own
    samplers give, ``total_samples // global_batch_size``, rounded up when ``drop_last`` is off."""
    steps = getattr(batch_sampler, "steps_per_epoch", None)
    if steps is not None:
        return steps
    total, batch = batch_sampler.total_samples, batch_sampler.global_batch_size
    return total // batch if getattr(batch_sampler, "drop_last", True) else -(-total // batch)


def steps_per_epoch(cfg, train_batch_sampler) -> int:
    """Training steps in one epoch, after ``limit_train_batches`` (``cfg`` is ``trainer.dpo``)."""
    return _limit_batches(sampler_steps_per_epoch(train_batch_sampler), cfg.get("limit_train_batches", 1.0))


def compute_max_steps(cfg, train_batch_sampler) -> int:
    """Steps a run takes: epochs x steps per epoch, capped by ``max_steps``."""
    max_steps = steps_per_epoch(cfg, train_batch_sampler) * cfg.max_epochs
    cap = cfg.get("max_steps", -1)
    return max_steps if cap is None or cap < 0 else min(max_steps, cap)


class DPOTrainer:
    """Coordinates DPO training of a :class:`MegatronGPTDPOModel`.

    ``cfg`` is ``trainer.dpo``: ``max_epochs``, ``max_steps``, ``val_check_interval``
    (steps, or a float fraction of an epoch), ``save_interval``,
    ``limit_train_batches``, ``limit_val_batches``, ``gradient_clip_val``.
    Dataloaders yield lists of dataset items; ``collate_fn`` turns one global
    batch into tensors and ``augment_dataloader`` adds the reference log-probs.
    ``optimizer`` is ours (:class:`~nemo_dpo.optim.optimizer.MegatronAdamW`) or a
    plain ``torch.optim`` optimizer over the model's parameters; the training
    loader's batch sampler ours or NeMo's (without ``steps_per_epoch``).
    """

    def __init__(self, cfg, model, optimizer, scheduler, train_dataloader, val_dataloader,
                 test_dataloader, collate_fn: DistributedCollateFunction, logger, ckpt_callback, run_timer):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_dataloader = train_dataloader
        self.val_dataloader = val_dataloader
        self.test_dataloader = test_dataloader
        self.collate_fn = collate_fn
        self.logger = logger
        self.ckpt_callback = ckpt_callback
        self.run_timer = run_timer
        self.step = 0
        # The step of the newest checkpoint this run saved or resumed from (None: none yet).
        self.last_checkpoint_step: int | None = None
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.num_steps_per_epoch = steps_per_epoch(cfg, train_dataloader.batch_sampler)
        if self.num_steps_per_epoch <= 0:
            raise ValueError("the training data gives no step per epoch (check global_batch_size and limit_train_batches)")
        self.limit_val_batches = _limit_batches(len(val_dataloader), cfg.get("limit_val_batches", 1.0))
        interval = cfg.get("val_check_interval", 1.0)
        self.val_check_interval = (
            max(int(interval * self.num_steps_per_epoch), 1) if isinstance(interval, float) else int(interval)
        )
        self.set_max_steps()
        # ``model.dpo.precompute_ref_log_probs``: a RefLogprobCache (set with use_ref_logprob_cache).
        self.ref_logprob_cache = None
        self._ref_logprob_tables: dict[str, object] = {}
        # Seconds the newest batch of augment_dataloader spent getting its reference log-probs.
        self._reference_time = 0.0

    # ------------------------------------------------------------------ steps
    def train_single_step(self, global_batch: dict) -> tuple[float, dict]:
        """Forward, backward and optimizer step on one global batch.

        A non-finite loss or gradient norm never updates the weights: it raises
        :class:`NonFiniteLossError`, or with ``skip_nonfinite_steps`` the step is
        skipped and counted in ``skipped_steps``.
        """
        self.optimizer.zero_grad()
        self.model.prepare_for_training_step()
        loss, metrics = self.model.get_loss_and_metrics(batch=global_batch, forward_only=False)
        self.model.finish_training_step()
        lr = self.optimizer.param_groups[0]["lr"]
        success, grad_norm = False, math.nan
        if math.isfinite(loss):
            clip_grad = self.cfg.get("gradient_clip_val", 0.0)
            if isinstance(self.optimizer, torch.optim.Optimizer):  # a plain torch optimizer, as NeMo scripts pass
                success, grad_norm, _ = step_torch_optimizer(self.optimizer, clip_grad)
            else:
                success, grad_norm, _ = self.optimizer.step(clip_grad=clip_grad)
        if not success:
            if not self.cfg.get("skip_nonfinite_steps", False):
                samples = self._global_sample_indices(global_batch)
                saved = (f"the checkpoint of step {self.last_checkpoint_step} is intact"
                         if self.last_checkpoint_step is not None else "no checkpoint of this run exists yet")
                raise NonFiniteLossError(
                    f"step {self.step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}) on training "
                    f"samples {samples}; the weights were not updated and {saved} "
                    "(trainer.dpo.skip_nonfinite_steps=True skips such steps instead)"
                )
            self.optimizer.zero_grad()
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss or gradient norm, update skipped", self.step + 1)
        # The schedule follows the step count, skipped steps included.
        self.scheduler.step()
        return loss, {**metrics, "grad_norm": grad_norm, "lr": lr, "loss": loss, "skipped_steps": self.skipped_steps}

    def validation_step(self, global_batch: dict) -> tuple[float, dict]:
        self.model.prepare_for_validation_step()
        loss, metrics = self.model.get_loss_and_metrics(batch=global_batch, forward_only=True)
        self.model.finish_validation_step()
        return loss, metrics

    @torch.no_grad()
    def run_validation(self) -> tuple[float, dict]:
        """Loss and metrics over ``limit_val_batches`` validation batches, weighted by pairs."""
        totals: dict[str, float] = defaultdict(float)
        pairs_seen = 0
        progress = tqdm(
            zip(range(self.limit_val_batches), self.augment_dataloader(self.val_dataloader)),
            total=self.limit_val_batches, desc="Validation steps", leave=False, disable=not is_rank0(),
        )
        start = time.perf_counter()  # a step's time includes fetching its batch and the reference forward
        for _, batch in progress:
            _, metrics = self.validation_step(batch)
            pairs = self._global_pairs(batch)
            metrics["validation_step_time"] = time.perf_counter() - start
            for key, value in metrics.items():
                totals[key] += value * pairs
            pairs_seen += pairs
            progress.set_postfix({f"val_{k}": f"{metrics[k]:.4g}" for k in ("loss", "acc")})
            start = time.perf_counter()
        val_metrics = {key: value / max(pairs_seen, 1) for key, value in totals.items()}
        return val_metrics.get("loss", float("nan")), val_metrics

    @staticmethod
    def _global_sample_indices(batch: dict) -> list[int]:
        """The dataset indices of the global batch's pairs (all data-parallel ranks), sorted."""
        local = batch["sample_index"].tolist() if "sample_index" in batch else []
        gathered = all_gather_objects(local, group=parallel_state.get_data_parallel_group())
        return sorted(index for indices in gathered for index in indices if index >= 0)

    @staticmethod
    def _global_pairs(batch: dict) -> int:
        count = torch.tensor([float(batch["chosen"].shape[0])])
        return int(all_reduce(count, group=parallel_state.get_data_parallel_group()).item())

    # ------------------------------------------------------------------- loop
    def fit(self) -> None:
        """Train for ``max_epochs`` / ``max_steps``, validating and saving on schedule."""
        if self.epoch >= self.cfg.max_epochs or self.step >= self.max_steps:
            return
        self.precompute_ref_logprobs()
        self.run_timer.start_time()
        # One bar for the run: steps done of max_steps, the time left at the current pace, loss and accuracy.
        with tqdm(initial=self.step, total=self.max_steps, desc="Training steps", unit="step", leave=True,
                  disable=not is_rank0()) as progress:
            for _ in range(self.epoch, self.cfg.max_epochs):
                steps_left = min(self.max_steps - self.step,
                                 self.num_steps_per_epoch - self.step % self.num_steps_per_epoch)
                if steps_left <= 0:
                    break
                # A step's time runs from asking for its batch to the end of its optimizer step: it
                # includes collating and the reference forward (augment_dataloader), and excludes
                # logging, validation and checkpoints.
                start = time.perf_counter()
                for _, global_batch in zip(range(steps_left), self.augment_dataloader(self.train_dataloader)):
                    _, metrics = self.train_single_step(global_batch)
                    self.consumed_samples += self.model.cfg.global_batch_size
                    metrics.update(
                        consumed_samples=self.consumed_samples,
                        step_time=time.perf_counter() - start,
                        reference_step_time=self._reference_time,
                        epoch=self.epoch + 1,
                    )
                    self.step += 1
                    self.logger.log_metrics(metrics, step=self.step, prefix="train/")
                    if self._finish_step(metrics, progress):
                        return
                    start = time.perf_counter()
        self.logger.finalize()

    def _finish_step(self, metrics: dict, progress) -> bool:
        """Validate and save as scheduled; True when the run must stop now (time limit)."""
        time_up = self.run_timer.is_finished()
        is_train_end = self.step >= self.max_steps
        validate = self.limit_val_batches > 0 and self.val_check_interval > 0 and (
            self.step % self.val_check_interval == 0 or is_train_end or time_up
        )
        save_interval = self.cfg.get("save_interval", 0)
        save = self.ckpt_callback is not None and (
            (save_interval > 0 and self.step % save_interval == 0) or is_train_end or time_up
        )
        shown = {f"train_{k}": v for k, v in metrics.items()}
        if validate:
            _, val_metrics = self.run_validation()
            self.logger.log_metrics(val_metrics, step=self.step, prefix="val/")
            shown.update({f"val_{k}": v for k, v in val_metrics.items()})
        progress.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if k in _PROGRESS_KEYS}, refresh=False)
        progress.update(1)
        if save:
            self.save(shown, is_train_end=is_train_end or time_up)
        if time_up:
            log.info("time limit reached at step %d: stopping after saving", self.step)
            self.logger.finalize()
        return time_up

    # ------------------------------------------------------------ checkpoints
    def save(self, extra_candidates: dict | None = None, is_train_end: bool = False) -> None:
        """Hand the trainer state and metrics to ``ckpt_callback`` (collective)."""
        barrier()
        candidates = {**self.state_dict(), **(extra_candidates or {})}
        self.ckpt_callback.custom_save(monitor_candidates=candidates, is_train_end=is_train_end)
        self.last_checkpoint_step = self.step

    def set_max_steps(self) -> None:
        self.max_steps = compute_max_steps(self.cfg, self.train_dataloader.batch_sampler)

    def state_dict(self) -> dict:
        return {"step": self.step, "consumed_samples": self.consumed_samples, "epoch": self.epoch,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = int(state_dict["step"])
        self.consumed_samples = int(state_dict["consumed_samples"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.last_checkpoint_step = self.step
        self.set_max_steps()

    @property
    def epoch(self) -> int:
        return self.step // self.num_steps_per_epoch

    # ------------------------------------------------------------------- data
    def use_ref_logprob_cache(self, cache) -> None:
        """Take reference log-probs of the training and validation sets from ``cache`` (a ``RefLogprobCache``)."""
        self.ref_logprob_cache = cache
        self._ref_logprob_tables.clear()

    def precompute_ref_logprobs(self) -> None:
        """With a cache: the reference log-probs of the training and validation sets, read or computed now."""
        if self.ref_logprob_cache is None:
            return
        self._ref_logprob_table(self.train_dataloader)
        if self.limit_val_batches > 0:
            self._ref_logprob_table(self.val_dataloader)

    def _ref_logprob_table(self, dataloader):
        """The precomputed log-probs of ``dataloader``'s data set; None without a cache (or for other loaders)."""
        splits = {id(self.train_dataloader): "train", id(self.val_dataloader): "validation"}
        split = splits.get(id(dataloader))
        if self.ref_logprob_cache is None or split is None:
            return None
        if split not in self._ref_logprob_tables:
            self._ref_logprob_tables[split] = self.ref_logprob_cache.table(
                split, dataloader, lambda items: _drop_sampler_padding(self.collate_fn(items)), self.model)
        return self._ref_logprob_tables[split]

    def augment_dataloader(self, dataloader):
        """Collate each global batch, drop sampler padding, add the reference per-token log-probs.

        With a reference log-prob cache they come from it, without a reference forward.
        A reference-free loss (``model.preference_loss.reference_free``: SimPO, ORPO,
        SFT) gets zeros and never runs the reference.
        """
        reference_free = getattr(getattr(self.model, "preference_loss", None), "reference_free", False)
        table = None if reference_free else self._ref_logprob_table(dataloader)
        for items in dataloader:
            batch = _drop_sampler_padding(self.collate_fn(items))
            start = time.perf_counter()
            if reference_free:
                pairs, seq_length = batch["chosen"].shape
                logprobs = torch.zeros(2 * pairs, seq_length - 1, dtype=torch.float32)
            elif table is not None:
                logprobs = table.lookup(batch)
            else:
                logprobs = self.model.get_ref_policy_logprobs(batch)
            chosen, rejected = torch.split(logprobs, len(logprobs) // 2, dim=0)
            batch["ref_policy_log_probs_chosen"] = chosen
            batch["ref_policy_log_probs_rejected"] = rejected
            self._reference_time = time.perf_counter() - start
            yield batch


_PROGRESS_KEYS = ("train_loss", "train_acc", "train_grad_norm", "train_lr", "val_loss", "val_acc")
