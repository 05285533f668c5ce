"""The README stays the operator's reference: it documents every setting and opens with the two commands."""

from __future__ import annotations

import re
from pathlib import Path

from services.config import ENDPOINT_KEYS, ENV_VARS, MODEM_KEYS, load_fleet_file

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


def _fleet_by_hand() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### A fleet by hand", 1)[1].split("\n## ", 1)[0]
    return section.split("```sh\n", 1)[1].split("\n```", 1)[0]


def test_the_fleet_by_hand_recipe_chooses_every_path_and_port(tmp_path: Path) -> None:
    recipe = _fleet_by_hand()
    for chosen in ("export SMSGW_STATE_DIR=", "export SMSGW_HEARTBEAT_DIR=", "export SMSGW_CONFIG="):
        assert chosen in recipe
    assert "SMSGW_METRICS_PORT=911$n" in recipe and "for n in 1 2 3" in recipe  # 9111-9113, clear of 9102-9104
    # The fleet file it writes validates, with its secret files read next to it (relative paths).
    toml = recipe.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    (tmp_path / "secrets").mkdir()
    for name, secret in re.findall(r"printf '([^']*)' >\"\$SMSGW_STATE_DIR/secrets/(\w+)\"", recipe):
        (tmp_path / "secrets" / secret).write_text(name, encoding="utf-8")
    (tmp_path / "fleet.toml").write_text(toml, encoding="utf-8")
    fleet = load_fleet_file(str(tmp_path / "fleet.toml"))
    assert [e.name for e in fleet.endpoints] == ["clinic", "helpline"]
    assert [e.secret for e in fleet.endpoints] == ["clinic-s3cret", "helpline-s3cret"]
    assert [modem for modem, _ in fleet.modem_limits] == ["modem1", "modem2", "modem3"]
    # Each reference server gets the secret its endpoint sends.
    assert "SMSSYNC_REFERENCE_SECRET=clinic-s3cret python -m reference_server --port 8700" in recipe
    assert "SMSSYNC_REFERENCE_SECRET=helpline-s3cret python -m reference_server --port 8710" in recipe
