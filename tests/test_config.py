"""Config: the shipped default loads; every invalid config is one line naming file, key and fix (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relayguard.config import ConfigError, load, loads

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_default_loads() -> None:
    s = load(ROOT / "etc" / "relayguard.toml")
    assert s.scoring.window == 600 and s.scoring.threshold == 10 and s.scoring.ban == 3600
    assert s.daemon.firewall == "nftables"
    assert s.source[0].path == "/var/log/mail.log"


def test_contract_minimal_config() -> None:
    s = loads(
        """
[daemon]
state_dir = "/var/lib/relayguard"
socket = "/run/relayguard/relayguard.sock"
firewall = "dry-run"
[scoring]
window = "10m"
threshold = 10
ban = "1h"
ignore = ["127.0.0.0/8", "::1", "203.0.113.0/24"]
[[source]]
path = "/var/log/mail.log"
rules = ["postfix"]
window = 300
threshold = 5
ban = "2d"
"""
    )
    assert s.source[0].window == 300 and s.source[0].ban == 2 * 86400
    assert [str(n) for n in s.ignore_nets()] == ["127.0.0.0/8", "::1/128", "203.0.113.0/24"]


INVALID = [
    ("[scoring]\nthresold = 3\n", "scoring.thresold", "did you mean 'threshold'"),
    ("[scoring]\nthreshold = \"ten\"\n", "scoring.threshold", "whole number"),
    ("[scoring]\nthreshold = 0\n", "scoring.threshold", "10 or more"),
    ("[scoring]\nwindow = \"10x\"\n", "scoring.window", "duration"),
    ("[scoring]\nban = -5\n", "scoring.ban", "duration"),
    ("[scoring]\nignore = [\"10.0.0.0/33\"]\n", "scoring.ignore[1]", "address or prefix"),
    ("[scoring]\nignore = \"127.0.0.1\"\n", "scoring.ignore", "list"),
    ("[scoring]\nlong_window = \"1m\"\n", "scoring.long_window", "at least window"),
    ("[scoring]\nmax_ban = \"1m\"\n", "scoring.max_ban", "at least ban"),
    ("[daemon]\nfirewall = \"pf\"\n", "daemon.firewall", "nftables, iptables, dry-run"),
    ("[daemon]\nsocket = 5\n", "daemon.socket", "quoted string"),
    ("[[source]]\nrules = [\"postfix\"]\n", "source[1]", "path"),
    ("[[source]]\npath = \"/x\"\nrules = [\"postfx\"]\n", "source[1].rules", "postfix"),
    ("[[source]]\npath = \"/x\"\nstart = \"middle\"\n", "source[1].start", "end, beginning"),
    ("[[source]]\npaht = \"/x\"\n", "source[1].paht", "did you mean 'path'"),
    ("[scoring\n", "not valid TOML", "syntax"),
    ("[bogus]\n", "bogus", "remove it"),
]


@pytest.mark.parametrize(("text", "key", "fix"), INVALID)
def test_invalid_config_names_file_key_and_fix(text: str, key: str, fix: str) -> None:
    with pytest.raises(ConfigError) as e:
        loads(text, "/etc/relayguard/relayguard.toml")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("/etc/relayguard/relayguard.toml: ")
    assert key in msg and "fix:" in msg and fix in msg


@pytest.mark.parametrize(("text", "key", "fix"), INVALID[:5])
def test_config_check_exits_2_with_one_line(tmp_path: Path, text: str, key: str, fix: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    r = subprocess.run([sys.executable, "-m", "relayguard", "config", "check", "--config", str(f)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(f) in lines[0] and key in lines[0]


def test_config_check_prints_what_it_would_do(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    f = tmp_path / "ok.toml"
    f.write_text(f'[daemon]\nfirewall = "dry-run"\n[[source]]\npath = "{log}"\nrules = ["postfix"]\n')
    r = subprocess.run([sys.executable, "-m", "relayguard", "config", "check", "--config", str(f)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "firewall dry-run" in r.stdout
    assert f"source {log} (exists): postfix" in r.stdout


def test_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "relayguard", "config", "check", "--config",
                        str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_a_source_may_use_a_local_rule_pack(tmp_path: Path) -> None:
    """`rules` takes a pack file's path (docs/rules.md); a broken pack is a config error naming it."""
    pack = tmp_path / "mine.toml"
    pack.write_text('programs = "^mine$"\n[[rule]]\nid = "bad-login"\nservice = "smtp"\nweight = 3\nwhy = "w"\n'
                    "regex = '^bad login from (?P<addr>\\\\S+)$'\n")
    s = loads(f'[[source]]\npath = "/x"\nrules = ["postfix", "{pack}"]\n', "/etc/relayguard/relayguard.toml")
    assert s.source[0].rules == ("postfix", str(pack))
    pack.write_text(pack.read_text().replace("(?P<addr>", "(?P<adr>"))
    with pytest.raises(ConfigError) as e:
        loads(f'[[source]]\npath = "/x"\nrules = ["{pack}"]\n', "/etc/relayguard/relayguard.toml")
    assert "source[1].rules" in str(e.value) and "mine.toml" in str(e.value) and "addr" in str(e.value)
    with pytest.raises(ConfigError, match="cannot read rule pack"):
        loads(f'[[source]]\npath = "/x"\nrules = ["{tmp_path}/nope.toml"]\n', "/etc/relayguard/relayguard.toml")
