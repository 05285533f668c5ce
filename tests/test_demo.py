"""The README's demo command runs the whole gateway and completes the round trip (``--check`` mode)."""

from __future__ import annotations

import subprocess
import sys
import uuid

from scripts.stack import ROOT
from tests.conftest import require_broker


def test_demo_round_trip() -> None:
    require_broker()
    vhost = f"smsgw-test-demo-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--check", "--vhost", vhost],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every SMS made the round trip" in result.stdout
