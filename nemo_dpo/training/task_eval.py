"""``model.data.task_eval``: the task metric measured before and after training (the default demo's "what DPO did").

``task/exact_match`` is the share of held-out prompts whose greedy answer (first
line) equals the chosen response's (:mod:`nemo_dpo.generation.task_metric`). It is
logged at the first step of the run and at its last, and printed at the end next
to the preference accuracy. On by default only with the embedded default data,
whose chosen responses are correct answers; for other data, turn it on where
the chosen response is the one right answer.
"""

from __future__ import annotations

from omegaconf import DictConfig

from nemo_dpo.data import DPOModelDataset
from nemo_dpo.data.blending import split_data_prefix
from nemo_dpo.generation.task_metric import TaskExactMatch

__all__ = ["TaskEvalRun", "build_task_eval", "check_task_eval"]

METRIC = "task/exact_match"


def _settings(data_cfg: DictConfig) -> dict:
    # Its keys are those of conf/gpt_dpo.yaml (checked with every other key by training/config.py).
    return dict(data_cfg.get("task_eval") or {})


def check_task_eval(data_cfg: DictConfig) -> None:
    """Refuse ``model.data.task_eval`` values that cannot work, before any work starts."""
    settings = _settings(data_cfg)
    if settings.get("enabled") not in (None, True, False):
        raise ValueError(f"model.data.task_eval.enabled={settings['enabled']!r} must be true, false or null")
    for key, minimum in (("num_prompts", 1), ("max_new_tokens", 1)):
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(f"model.data.task_eval.{key}={value!r} must be a positive integer"
                             + (" or null (all)" if key == "num_prompts" else ""))
    if settings.get("max_new_tokens") is None:
        raise ValueError("model.data.task_eval.max_new_tokens must be a positive integer")


class TaskEvalRun:
    """The task metric of one run: ``measure(step)`` logs it; the logger it wraps stays open until the last one.

    ``logger`` is what the trainer gets: it passes every metric on and leaves
    ``finalize`` to the run (the trainer finalizes its logger when ``fit`` ends,
    before the last measurement). It also remembers the last ``val/acc``.
    """

    def __init__(self, metric: TaskExactMatch, model, logger):
        self.metric = metric
        self.model = model
        self.logger = _HeldOpenLogger(logger)
        self.values: list[float] = []

    def measure(self, step: int) -> float:
        """Measure the policy now and log it at ``step``. Collective."""
        value = self.metric.measure(self.model.model)
        self.values.append(value)
        self.logger.log_metrics({"exact_match": value}, step=step, prefix="task/")
        return value

    def summary(self) -> str:
        """One line: the metric before and after, and the last preference accuracy."""
        first, last = self.values[0], self.values[-1]
        accuracy = self.logger.last_val_acc
        acc = f"; preference accuracy (val/acc) {accuracy:.3f}" if accuracy is not None else ""
        return (f"{METRIC} (greedy answers to {len(self.metric)} held-out prompts): {first:.3f} before training, "
                f"{last:.3f} after{acc}")


class _HeldOpenLogger:
    def __init__(self, logger):
        self._logger = logger
        self.last_val_acc: float | None = None

    def log_metrics(self, metrics: dict, step: int, prefix: str = "") -> None:
        if prefix == "val/" and "acc" in metrics:
            self.last_val_acc = float(metrics["acc"])
        self._logger.log_metrics(metrics, step, prefix)

    def finalize(self) -> None:
        """Left to the run, after its last task measurement."""

    def __getattr__(self, name):
        return getattr(self._logger, name)


def uses_default_data(data_cfg: DictConfig) -> bool:
    """Whether the run trains on the embedded default data (``data_prefix`` names no training file)."""
    return split_data_prefix(data_cfg.get("data_prefix"), "train") is None


def build_task_eval(model_cfg: DictConfig, model, tokenizer, val_ds, logger) -> TaskEvalRun | None:
    """The run's task metric per ``model.data.task_eval`` (None when off); ``enabled: null`` is on for the default data.

    Its prompts are ``task_eval.data_prefix`` (any data format; null: the validation data).
    """
    data_cfg = model_cfg.data
    settings = _settings(data_cfg)
    enabled = settings.get("enabled")
    if not (uses_default_data(data_cfg) if enabled is None else enabled):
        return None
    prefix = settings.get("data_prefix")
    if prefix is not None:
        dataset = DPOModelDataset(model_cfg, tokenizer, "task_eval", prefix, None, None,
                                  data_cfg.seq_length or model_cfg.encoder_seq_length, model_cfg.seed)
    elif val_ds is None:
        raise ValueError("model.data.task_eval.enabled=true needs prompts: validation data or task_eval.data_prefix")
    else:
        dataset = val_ds
    metric = TaskExactMatch(dataset, tokenizer, model.vocab_size, settings["max_new_tokens"],
                            settings.get("num_prompts"))
    return TaskEvalRun(metric, model, logger)
