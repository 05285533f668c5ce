"""The README stays the operator's reference: it documents every setting and opens with the two commands."""

from __future__ import annotations

from pathlib import Path

from services.config import ENDPOINT_KEYS, ENV_VARS, MODEM_KEYS

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [name for name in ENV_VARS if f"`{name}`" not in readme]
    assert missing == []


def test_readme_opens_with_demo_and_test_commands_and_ci_runs_the_same() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = readme.split("```")[1]
    assert "scripts/demo" in first_block and "scripts/test" in first_block
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_documents_every_fleet_key_and_the_smsgw_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    fleet = readme.split("## Fleet configuration", 1)[1].split("\n## ", 1)[0]
    missing = sorted(key for key in {*ENDPOINT_KEYS, *MODEM_KEYS, "prefix", "modems"} if f"`{key}`" not in fleet)
    assert missing == [], f"keys of services/config/fleet_file.py not in README's Fleet configuration: {missing}"
    for command in ("smsgw parked", "smsgw config check", ".venv/bin/smsgw"):
        assert command in readme
