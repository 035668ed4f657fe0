"""The config reference must document every key the schema accepts (it is the user's contract)."""

from pathlib import Path

from fedpal.config import all_keys

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_every_config_key_is_documented():
    text = DOC.read_text()
    missing = [key for key in all_keys() if f"`{key}`" not in text]
    assert not missing, f"undocumented config keys: {missing}"


def test_the_readme_method_table_lists_exactly_the_registered_algorithms():
    import re
    from pathlib import Path

    from fedpal.algorithms.core.registry import all_algorithms

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_0-9]+)` \|", section, flags=re.MULTILINE)
    assert sorted(rows) == sorted(all_algorithms()) and len(rows) == len(set(rows))
    for name, cls in all_algorithms().items():  # the "heterogeneous models" column says what the class declares
        line = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
        assert line.split("|")[4].strip() == ("yes" if cls.supports_heterogeneous_models else "no"), name
