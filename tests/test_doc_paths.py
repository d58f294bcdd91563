"""Docs and recorded results name no absolute path of the machine they were written on."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Home, scratch and temporary folders of Linux and macOS machines.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(home|Users|root|work|tmp|mnt|scratch)/")


def recorded_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "*.md",
                             "benchmarks/results/**"], cwd=REPO, capture_output=True, check=True).stdout.decode()
    return [REPO / name for name in filter(None, listed.split("\0")) if (REPO / name).is_file()]


def test_no_absolute_machine_path_in_docs_or_results():
    files = recorded_files()
    assert REPO / "benchmarks" / "RESULTS.md" in files and REPO / "README.md" in files
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line) or str(REPO) in line:
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []
