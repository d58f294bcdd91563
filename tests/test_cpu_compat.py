"""The CPU shim rewrites exactly the CUDA-isms megatron-core uses, and nothing else."""

import pytest
import torch

from nemo_dpo.parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is inactive on GPU")


def probe_shim():
    assert cpu_compat.enable_cpu_compat() and cpu_compat.cpu_compat_active()
    assert cpu_compat.enable_cpu_compat()  # idempotent
    made = [
        torch.zeros([], dtype=torch.int, device="cuda"),  # pipeline schedules
        torch.empty((3,), device=torch.cuda.current_device(), dtype=torch.int64),  # p2p shapes
        torch.ones(2, device=torch.device("cuda", 0)),
        torch.arange(0, 4, 2, device="cuda:0"),  # rotary inv_freq
        torch.ones(2).cuda(),
        torch.ones(2).to("cuda"),
        torch.ones(2).to(device="cuda"),
    ]
    torch.cuda.synchronize()
    on_cpu = all(t.device.type == "cpu" for t in made)
    # Non-device arguments and CPU tensors pass through untouched.
    kept = torch.ones(2, dtype=torch.float64).to(torch.float16)
    assert torch.ones(2, device="meta").device.type == "meta"
    # megatron's optimizer asks parameters for their CUDA type name; converting still converts.
    type_names = [torch.ones(1, dtype=d).type() for d in (torch.float32, torch.bfloat16, torch.float16, torch.int64)]
    assert torch.ones(1).type(torch.float64).dtype == torch.float64
    return on_cpu, kept.dtype, cpu_compat.transformer_config_overrides(), type_names


def test_shim_maps_cuda_to_cpu(dist_pool):
    on_cpu, dtype, overrides, type_names = dist_pool.run(1, probe_shim)[0]
    assert on_cpu
    assert type_names == ["torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", "torch.cuda.HalfTensor",
                          "torch.LongTensor"]
    assert dtype == torch.float16
    assert overrides["batch_p2p_comm"] is False
    assert overrides["gradient_accumulation_fusion"] is False
