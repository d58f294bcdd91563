"""megatron-core's AdamW, on GPU and (through :mod:`nemo_dpo.parallel.cpu_compat`) on CPU.

One optimizer for every device and precision: :func:`get_megatron_optimizer`
gives fp32 training, bf16 training with fp32 master weights, and with
``use_distributed_optimizer`` the ZeRO-1 ``DistributedOptimizer`` (master weights
and Adam moments sharded over data parallelism). :class:`MegatronAdamW` adds what
a DPO loop needs around it: a step that never applies a non-finite gradient and
reports the gradient norm, clipping chosen per step, and a checkpoint state that
reshards to any TP/PP/DP layout.
"""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from nemo_dpo.optim.settings import OptimizerSettings

# Saved in the canonical per-parameter layout, so any TP/PP/DP layout can load it.
_CHECKPOINT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class MegatronAdamW:
    """AdamW over megatron-DDP-wrapped model chunks (wrap them with ``settings.ddp_config()``).

    ``step(clip_grad)`` keeps megatron's contract ``(update_successful,
    grad_norm, num_zeros_in_grad)``. ``optimizer`` is the torch optimizer whose
    ``param_groups`` carry the learning rate (what an LR scheduler drives).
    """

    def __init__(self, model_chunks, settings: OptimizerSettings):
        for chunk in model_chunks:
            ddp_config = getattr(chunk, "ddp_config", None)
            if ddp_config is None or ddp_config.use_distributed_optimizer != settings.use_distributed_optimizer:
                raise ValueError("model chunks must be wrapped in megatron DDP with settings.ddp_config()")
        self.settings = settings
        self.megatron_optimizer = get_megatron_optimizer(settings.megatron_config(), list(model_chunks))
        # Dense models give one optimizer (megatron chains a second only for MoE experts).
        parts = getattr(self.megatron_optimizer, "chained_optimizers", [self.megatron_optimizer])
        if len(parts) != 1:
            raise NotImplementedError(f"expected one megatron optimizer, got {len(parts)} (MoE is not supported)")
        self._part = parts[0]
        self.optimizer = self._part.optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.megatron_optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, clip_grad: float = 0.0) -> tuple[bool, float, None]:
        """Clip to global norm ``clip_grad`` (0: no clipping), then update.

        The gradient norm is computed first, over every rank's gradients: a
        non-finite one skips the update on every rank and reports ``False``.
        """
        found_inf = self._part.prepare_grads()
        grad_norm = float(self._part.get_grad_norm())
        if found_inf or not math.isfinite(grad_norm):
            self.zero_grad()
            return False, grad_norm, None
        if clip_grad > 0:
            clip_grad_by_total_norm_fp32(self._part.get_parameters(), clip_grad, grad_norm)
        return self._part.step_with_ready_grads(), grad_norm, None

    def state_bytes(self) -> int:
        """Bytes this rank holds for the optimizer: Adam moments plus fp32 master weights.

        With fp32 parameters the model's own weights are the master weights and
        are not counted.
        """
        moments = sum(value.numel() * value.element_size()
                      for state in self.optimizer.state.values() for value in state.values()
                      if torch.is_tensor(value) and value.ndim > 0)
        masters = 0
        if self.settings.mixed_precision:
            masters = sum(p.numel() * p.element_size() for group in self.optimizer.param_groups for p in group["params"])
        return moments + masters

    # ------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        """The optimizer state as megatron sharded tensors keyed like the model's, reshardable.

        For loading, call with ``is_loading=True`` and pass what
        ``dist_checkpointing.load`` filled in to :meth:`load_sharded_state_dict`.
        """
        if is_loading:
            self._create_empty_state()
        return self._part.sharded_state_dict(
            model_sharded_state_dict, is_loading=is_loading, metadata=_CHECKPOINT_METADATA
        )

    def load_sharded_state_dict(self, state_dict: dict) -> None:
        """Restore master weights, moments and step from a loaded sharded state dict."""
        if isinstance(self._part, DistributedOptimizer):
            self._load_distributed(state_dict)
        else:
            self._part.load_state_dict(state_dict)
        self._untie_steps()

    def _load_distributed(self, state_dict: dict) -> None:
        # megatron-core 0.16 gives torch's Adam a 'step' per parameter but the
        # fully reshardable loader copies only tensors saved per parameter, so it
        # fails on 'step'. Load the step through load_state_dict (without the
        # parameter state), then the parameter state with the steps set aside.
        param_state = state_dict.pop("param_state")
        self._part.load_state_dict(state_dict)
        steps = {param: state.pop("step") for param, state in self.optimizer.state.items()}
        self._part.load_parameter_state_from_fully_reshardable(param_state)
        for param, state in self.optimizer.state.items():
            state["step"] = steps[param]

    def _create_empty_state(self) -> None:
        """Zero Adam state for every parameter (something for a checkpoint to load into)."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)

    def _untie_steps(self) -> None:
        # Loading hands every parameter the same step tensor; torch's Adam
        # increments each parameter's step in place, so each needs its own.
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].detach().clone()


def build_optimizer(model_chunks, optim_cfg, params_dtype: torch.dtype = torch.float32) -> MegatronAdamW:
    """The optimizer ``model.optim`` asks for, over chunks wrapped with the same settings' DDP config."""
    return MegatronAdamW(model_chunks, OptimizerSettings.from_config(optim_cfg, params_dtype))
