"""docs/migrating_from_nemo_aligner.md states the key table the code enforces."""

from pathlib import Path

from nemo_dpo.training.nemo_keys import key_table_rows

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "migrating_from_nemo_aligner.md"


def test_the_guide_lists_every_key_rule_as_the_code_has_it():
    text = GUIDE.read_text()
    table = text[text.index("## Every NeMo Aligner key"):]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    expected = [f"| `{key}` | {kind} | {why.replace('|', chr(92) + '|')} |" for key, kind, why in key_table_rows()]
    assert rows == expected


def test_readme_links_the_guide():
    readme = (GUIDE.parent.parent / "README.md").read_text()
    assert "docs/migrating_from_nemo_aligner.md" in readme
