import multiprocessing.util
import os
import tempfile
import warnings

import pytest
import torch

from distributed_pool import DistributedPool
from nemo_dpo.data.tokenizer import sweep_stale_tokenizer_dirs

# megatron-core warns at import about optional CUDA extensions (apex, TE) that
# the CPU path does not use.
warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine|transformer_engine).*")


@pytest.fixture(scope="session", autouse=True)
def _private_temp_dir(tmp_path_factory):
    """Every process the session starts keeps its temporary files in one folder removed at the end.

    megatron-core imports wandb when it is installed, and wandb makes temporary folders at
    import that only a normal interpreter exit removes; the pool's workers end without one.
    """
    # pytest's folder and this process's multiprocessing folder stay where they are removed at exit.
    tmp_path_factory.getbasetemp()
    multiprocessing.util.get_temp_dir()
    previous = os.environ.get("TMPDIR")
    with tempfile.TemporaryDirectory(prefix="nemo_dpo_tests_") as folder:
        os.environ["TMPDIR"] = folder
        tempfile.tempdir = None  # re-read TMPDIR
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = previous
            tempfile.tempdir = None


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
