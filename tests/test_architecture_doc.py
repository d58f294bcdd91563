"""docs/architecture.md's package table is the import rule: the code must keep to it."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nemo_dpo"
# First cell: one or more units, each a package (`data/`) or a part of one (`data/nlp/`, `utils/utils.py`).
ROW = re.compile(r"^\| (`[\w./]+`(?:, `[\w./]+`)*) \| .* \|(.*)\|$")


def documented_rows() -> tuple[dict[str, str], dict[str, set[str]]]:
    """``(unit of each documented path, units each unit may import)``; a row's first path names its unit."""
    unit_of_path, rules = {}, {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            paths = [path.rstrip("/") for path in re.findall(r"`([\w./]+)`", match.group(1))]
            rules[paths[0]] = {name.rstrip("/") for name in re.findall(r"`([\w./]+)`", match.group(2))}
            unit_of_path.update((path, paths[0]) for path in paths)
    return unit_of_path, rules


def unit_of(relative: str, unit_of_path: dict[str, str]) -> str | None:
    """The unit of a module path below nemo_dpo/ (``data/nlp/builders`` or ``data/nlp/builders.py``): the longest documented match."""
    stem = relative.removesuffix(".py")
    matches = [path for path in unit_of_path
               if stem == path.removesuffix(".py") or stem.startswith(path.removesuffix(".py") + "/")]
    return unit_of_path[max(matches, key=len)] if matches else None


def imported_units(unit_of_path: dict[str, str]) -> dict[str, tuple[str, set[str]]]:
    """For each module: its unit and the other units it imports."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = str(path.relative_to(PACKAGE))
        if "/" not in relative:
            continue
        own = unit_of(relative, unit_of_path)
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            for module in modules:
                parts = module.split(".")
                if parts[0] == "nemo_dpo" and len(parts) > 1:
                    unit = unit_of("/".join(parts[1:]), unit_of_path)
                    if unit != own:
                        names.add(unit)
        found[str(path.relative_to(ROOT))] = (own, names)
    return found


def test_every_package_is_documented():
    unit_of_path, _ = documented_rows()
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file() and p.name != "assets"}
    assert {path for path in unit_of_path if "/" not in path} == packages


def test_imports_follow_the_documented_direction():
    unit_of_path, rules = documented_rows()
    breaches = [f"{module} imports {sorted(names - rules[own])}"
                for module, (own, names) in imported_units(unit_of_path).items() if names - rules[own]]
    assert not breaches, breaches


def test_documented_layers_are_acyclic():
    _, rules = documented_rows()
    done, path = set(), []

    def visit(unit):
        assert unit not in path, f"import cycle: {' -> '.join(path + [unit])}"
        if unit in done:
            return
        path.append(unit)
        for dependency in rules.get(unit, ()):
            visit(dependency)
        path.pop()
        done.add(unit)

    for unit in rules:
        visit(unit)


def test_torch_cuda_only_under_parallel():
    users = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
             if "torch.cuda" in p.read_text() and p.parent.name != "parallel"]
    assert users == []
