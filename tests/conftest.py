import warnings

import pytest
import torch

from distributed_pool import DistributedPool
from nemo_dpo.data.tokenizer import sweep_stale_tokenizer_dirs

# megatron-core warns at import about optional CUDA extensions (apex, TE) that
# the CPU path does not use.
warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine|transformer_engine).*")


@pytest.fixture(scope="session")
def dist_pool():
    """Four gloo workers shared by the whole test session."""
    pool = DistributedPool(4)
    yield pool
    pool.close()
    # The workers were killed: what they staged is left to the next start unless swept now.
    sweep_stale_tokenizer_dirs()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
