"""The commands of docs/multi_node.md and docs/gpu_install.md: run here, or marked with why not."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
NOT_RUN = "*Not run by the tests:"


def bash_blocks(doc: Path) -> list[tuple[str, str]]:
    """``(paragraph before, code)`` of each bash block of ``doc``."""
    text = doc.read_text()
    return [(before.strip().split("\n\n")[-1], code)
            for before, code in re.findall(r"((?:(?!```).)*?)```bash\n(.*?)```", text, flags=re.S)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def one_machine_block() -> str:
    (block,) = [code for _, code in bash_blocks(DOCS / "multi_node.md") if "localhost:" in code]
    return block


def python_checks() -> list[str]:
    """The one-line ``python -c`` checks of docs/gpu_install.md, in order."""
    return [line for _, code in bash_blocks(DOCS / "gpu_install.md") for line in code.splitlines()
            if line.startswith("python -c ")]


@pytest.mark.parametrize("doc", ["multi_node.md", "gpu_install.md"])
def test_every_command_is_run_by_a_test_or_says_why_not(doc):
    blocks = bash_blocks(DOCS / doc)
    assert blocks
    run_here = {one_machine_block()} | {code for _, code in blocks if code.splitlines()
                                        and all(line.startswith("python -c ") for line in code.splitlines())}
    for before, code in blocks:
        assert code in run_here or before.startswith(NOT_RUN), f"{doc}: neither run nor explained:\n{code}"


@pytest.mark.slow
def test_two_launchers_meet_through_the_c10d_rendezvous_on_one_machine(tmp_path):
    """docs/multi_node.md's one-machine block, as written: two torchrun "nodes" of one process, TP=2."""
    log_dir = tmp_path / "two_nodes"
    block = one_machine_block().replace("localhost:29400", f"localhost:{free_port()}")
    block = block.replace("results/two_nodes", str(log_dir))
    # torchrun as this interpreter's module: the same launcher, from the test environment.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", block], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    # trainer.num_nodes=2 x devices=1 and TP=2 both require a world of the two processes.
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
    assert (log_dir / "checkpoints" / "final_model").is_dir()


# What each check prints on this CPU machine (no CUDA, transformer-engine or apex), in order.
CPU_ANSWERS = [r"^\S+ None False$", r"^False$", r"^ColumnParallelLinear$", r"^<class 'torch\.optim\.adamw\.AdamW'>$"]


def test_gpu_install_checks_give_the_cpu_answers_here():
    checks = python_checks()
    assert len(checks) == len(CPU_ANSWERS) + 1
    for check, answer in zip(checks, CPU_ANSWERS):
        result = subprocess.run(["bash", "-c", check.replace("python ", f"{sys.executable} -W ignore ", 1)],
                                cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0 and re.match(answer, result.stdout.strip()), (check, result.stdout, result.stderr)
    # The apex check fails here as it does on any machine without NVIDIA apex.
    result = subprocess.run([sys.executable, "-c", checks[-1].split('"')[1]], capture_output=True, text=True)
    assert result.returncode != 0 and "No module named 'apex'" in result.stderr


def test_readme_links_the_docs():
    readme = (REPO / "README.md").read_text()
    for doc in ("docs/multi_node.md", "docs/gpu_install.md"):
        assert f"]({doc})" in readme and (REPO / doc).is_file(), doc
