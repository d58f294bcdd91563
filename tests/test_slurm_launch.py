"""Starting under Slurm (``srun python ...``) as NeMo users do, without Slurm: its variables set by hand."""

import os
import socket

import pytest

from nemo_dpo.parallel.initialize import first_host, launch_environment
from training_workers import slurm_process_group

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _slurm_port_and_job_id() -> tuple[int, str]:
    """A free port in Lightning's Slurm range (15000 + the job id's last 4 digits) and a job id giving it."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if 15000 <= port <= 24999:
            return port, f"42{port - 15000:04d}"
    for port in range(15000, 25000):  # the kernel hands out ports elsewhere: find one in range
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port, f"42{port - 15000:04d}"
    raise RuntimeError("no free port in 15000-24999")


def test_two_srun_tasks_form_one_process_group(dist_pool):
    """Two processes (the pool's) given only Slurm's variables start one group; rendezvous as Lightning does."""
    port, job_id = _slurm_port_and_job_id()
    slurm = dict(SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost,node[02-03]", SLURM_JOB_ID=job_id,
                 SLURM_JOB_NAME="dpo")
    outputs = dist_pool.run(2, slurm_process_group, slurm)
    assert [(o["rank"], o["world"], o["local_rank"]) for o in outputs] == [(0, 2, 0), (1, 2, 1)]
    assert {(o["addr"], o["port"]) for o in outputs} == {("localhost", str(port))}
    assert [o["total"] for o in outputs] == [3.0, 3.0]  # 1 + 2: both ranks in one group


@pytest.mark.parametrize("nodelist,host", [
    ("node[01-03,07]", "node01"), ("gpu5", "gpu5"), ("a[1-2],b[3]", "a1"), ("rack1-[009-010]-ib,x", "rack1-009-ib"),
    ("n[7,3-4]", "n7"),
])
def test_first_host_of_a_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_launch_environment():
    slurm = dict(SLURM_NTASKS="16", SLURM_PROCID="9", SLURM_LOCALID="1", SLURM_JOB_NODELIST="dgx[003-004]",
                 SLURM_JOB_ID="123456")
    assert launch_environment(slurm) == dict(RANK="9", LOCAL_RANK="1", WORLD_SIZE="16", MASTER_ADDR="dgx003",
                                             MASTER_PORT=str(15000 + 3456))
    assert launch_environment({**slurm, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"
    # torchrun's variables win; an interactive allocation is no launch; neither: nothing to add.
    assert launch_environment({**slurm, "RANK": "0", "WORLD_SIZE": "2"}) == {}
    assert launch_environment({**slurm, "SLURM_JOB_NAME": "bash"}) == {}
    assert launch_environment({}) == {}


@pytest.fixture
def slurm_env(monkeypatch):
    for key in [*LAUNCH_VARS, *(k for k in os.environ if k.startswith("SLURM_"))]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_mismatched_devices_fail_in_one_line_before_any_work(slurm_env):
    from nemo_dpo.training import compose_config, train

    slurm_env.setenv("SLURM_NTASKS", "2")
    slurm_env.setenv("SLURM_PROCID", "0")
    cfg = compose_config(["trainer.num_nodes=2", "trainer.devices=8"])
    with pytest.raises(ValueError, match=r"trainer.num_nodes=2 x trainer.devices=8 does not match the 2 process") as e:
        train(cfg)
    assert "\n" not in str(e.value)
    import torch.distributed as dist

    assert not dist.is_initialized()  # refused before the process group started


def test_matching_or_default_sizes_pass(slurm_env):
    from omegaconf import OmegaConf

    from nemo_dpo.training.run import check_launch_size

    check_launch_size(OmegaConf.create({"num_nodes": 2, "devices": 8}), world_size=16)
    check_launch_size(OmegaConf.create({"num_nodes": 1, "devices": 1}), world_size=16)  # defaults: any launch
    check_launch_size(OmegaConf.create({"num_nodes": 1, "devices": 2}), world_size=2)
    slurm_env.setenv("WORLD_SIZE", "4")
    slurm_env.setenv("RANK", "0")
    with pytest.raises(ValueError, match="the 4 process"):
        check_launch_size(OmegaConf.create({"num_nodes": 1, "devices": 2}))
