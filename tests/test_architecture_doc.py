"""docs/architecture.md's package table is the import rule: the code must keep to it."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nemo_dpo"
ROW = re.compile(r"^\| `(\w+)/` \| .* \|(.*)\|$")


def documented_rules() -> dict[str, set[str]]:
    rules = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            rules[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(2)))
    return rules


def imported_packages(package: str) -> dict[str, set[str]]:
    """Other nemo_dpo packages each module of ``package`` imports, by module path."""
    found = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            for module in modules:
                parts = module.split(".")
                if parts[0] == "nemo_dpo" and len(parts) > 1 and parts[1] != package:
                    names.add(parts[1])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_every_package_is_documented():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file() and p.name != "assets"}
    assert set(documented_rules()) == packages


def test_imports_follow_the_documented_direction():
    rules = documented_rules()
    breaches = [
        f"{module} imports {sorted(names - rules[package])}"
        for package in rules
        for module, names in imported_packages(package).items()
        if names - rules[package]
    ]
    assert not breaches, breaches


def test_torch_cuda_only_under_parallel():
    users = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
             if "torch.cuda" in p.read_text() and p.parent.name != "parallel"]
    assert users == []
