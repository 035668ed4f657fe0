"""The config reference must document every key the schema accepts (it is the user's contract)."""

from pathlib import Path

from fedpal.config import all_keys

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_every_config_key_is_documented():
    text = DOC.read_text()
    missing = [key for key in all_keys() if f"`{key}`" not in text]
    assert not missing, f"undocumented config keys: {missing}"
