"""Lets megatron-core's CUDA-only code paths run on CPU with the gloo backend.

megatron-core hard-codes CUDA in code that is otherwise device-agnostic. The places
this module exists for (checked against megatron-core 0.16.1):

* ``pipeline_parallel/schedules.py`` allocates ``torch.zeros([], device="cuda")``
  for token counts in every schedule.
* ``pipeline_parallel/p2p_communication.py`` allocates receive buffers with
  ``device=torch.cuda.current_device()`` and calls ``torch.cuda.synchronize()``
  after every exchange.
* ``distributed/param_and_grad_buffer.py`` (its DDP) allocates the contiguous
  parameter and gradient buffers with ``device=torch.cuda.current_device()``.
* ``models/common/embeddings/rotary_pos_embedding.py`` builds inverse
  frequencies on ``torch.cuda.current_device()``.
* ``tensor_parallel/random.py`` (activation recompute's ``CheckpointFunction``)
  saves and restores the CUDA RNG state through ``_get_cuda_rng_state`` and
  ``_set_cuda_rng_state``, which assert that torch was built with CUDA.
* ``optimizer/`` (megatron's optimizer, the distributed one included) compares
  ``param.type()`` with ``'torch.cuda.FloatTensor'`` and its bf16/fp16 names, and
  allocates its norm and overflow buffers with ``device='cuda'``.

On a machine without CUDA, :func:`enable_cpu_compat` installs, process-wide:

* a :class:`torch.overrides.TorchFunctionMode` that rewrites any CUDA device
  argument (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")`` or a bare device
  index) to ``"cpu"``, turns ``Tensor.cuda()`` into a no-op and makes
  ``Tensor.type()`` name the CUDA tensor type of the tensor's dtype;
* ``torch.cuda.current_device`` returning 0 (an index the mode maps to CPU) and
  no-op ``torch.cuda.synchronize``;
* the same mapping inside backward passes started with ``torch.autograd.backward``
  (megatron's sequence-parallel linear layers allocate on the CUDA device there);
* megatron's CUDA RNG state getter and setter reading and writing the CPU
  generator, which is the one that draws "CUDA" tensors here, and
  ``torch.cuda.get_rng_state``/``torch.cuda.manual_seed`` doing the same, so that
  ``model_parallel_cuda_manual_seed`` can register the RNG tracker's states
  (sequence parallelism draws its dropout masks inside ``tracker.fork()``).

Nothing is patched when CUDA is available: on GPU the same calls reach the real
CUDA runtime. (The distributed optimizer also needs megatron's gloo process
groups, which :mod:`nemo_dpo.parallel.initialize` creates on every device.)
"""

from __future__ import annotations

import logging

import torch
from megatron.core.tensor_parallel import random as megatron_random
from torch.overrides import TorchFunctionMode

_MODE: "_CudaToCpuMode | None" = None
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float16: "torch.cuda.HalfTensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


_BACKWARD_ENTRY_POINTS = (torch.autograd.backward, torch.Tensor.backward, torch.autograd.grad)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizer checks parameters against CUDA type names.
            return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
        if func in _BACKWARD_ENTRY_POINTS:
            # A mode is off while its handler runs, so by default all of backward would run without
            # it; megatron's backward passes allocate on torch.cuda.current_device() too (the
            # sequence-parallel reduce-scatter buffers). Keep the mode on for them.
            with self:
                return torch.overrides.redispatch_function(func, types, args, kwargs)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        elif func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def transformer_config_overrides() -> dict:
    """``TransformerConfig`` settings the CPU needs; empty on GPU.

    * Fusions that exist only as CUDA kernels are turned off.
    * ``batch_p2p_comm=False``: the interleaved pipeline schedule posts a send to
      the previous and a send to the next stage in one batch; at PP=2 both peers
      are the same rank, and gloo matches same-tag messages in posting order, so
      batched exchanges can deliver a gradient where an activation is expected.
      Unbatched exchanges are ordered by rank parity and match up.
    """
    if torch.cuda.is_available():
        return {}
    return dict(
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        batch_p2p_comm=False,
    )


def _noop(*args, **kwargs):
    return None


def _current_device_index() -> int:
    return 0


def _get_rng_state(*args, **kwargs) -> torch.Tensor:
    # torch.get_rng_state returns a copy, so the saved state cannot drift.
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


class _SameGeneratorWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def enable_cpu_compat() -> bool:
    """Install the CPU shim when CUDA is absent; idempotent. Returns whether it is active."""
    global _MODE
    if torch.cuda.is_available():
        return False
    if _MODE is None:
        torch.cuda.current_device = _current_device_index
        torch.cuda.synchronize = _noop
        # CheckpointFunction looks these up in its module at call time.
        megatron_random._get_cuda_rng_state = _get_rng_state
        megatron_random._set_cuda_rng_state = _set_rng_state
        # The RNG tracker's add() seeds and reads the CUDA generator directly.
        torch.cuda.get_rng_state = _get_rng_state
        torch.cuda.manual_seed = torch.manual_seed
        # tracker.fork() warns when the CPU generator moved inside it, which here it always does.
        logging.getLogger(megatron_random.__name__).addFilter(_SameGeneratorWarningFilter())
        _MODE = _CudaToCpuMode()
        _MODE.__enter__()
    return True


def cpu_compat_active() -> bool:
    """Whether :func:`enable_cpu_compat` has installed the shim in this process."""
    return _MODE is not None
