"""Shared fixtures. Tests run as root on Debian (scripts/test.sh); firewall tests use their own namespaces."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GENLOG = SHARED / "bench" / "genlog.py"

# Classic syslog times are local time: pin the zone so expectations do not depend on the machine.
os.environ["TZ"] = "UTC"
if hasattr(__import__("time"), "tzset"):
    __import__("time").tzset()


@pytest.fixture(scope="session")
def genlog_path() -> Path:
    if not GENLOG.exists():
        pytest.fail(f"{GENLOG} missing: the shared benchmark generator must sit beside the repository")
    return GENLOG


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
