"""scripts/install.sh for real, on a "fresh machine" made of namespaces: a new network namespace (the
daemon's nftables table lands there, never in the host's), a new PID namespace (whatever the script
starts ends with it), and a mount namespace where /opt, /etc, /usr/local, /var and /run are overlays
whose writes go to the test's directory. The host keeps no trace; the script sees the real paths.

pip cannot reach an index from the empty network namespace: the test first gathers the wheels the
project needs (from the host, with pip's normal configuration) and hands them to install.sh through
pip's own PIP_NO_INDEX/PIP_FIND_LINKS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OVERLAID = ("/opt", "/etc", "/usr/local", "/var", "/run")

# Runs as PID 1 of the new PID namespace; every step prints a marker line the test checks.
SCRIPT = r"""
set -eu
T=$1 REPO=$2
ip link set lo up
for d in OVERLAID; do
    n=$(echo "$d" | tr / _)
    mkdir -p "$T/up$n" "$T/work$n"
    mount -t overlay overlay -o "lowerdir=$d,upperdir=$T/up$n,workdir=$T/work$n" "$d"
done
[ -e /usr/local/bin/relayguard ] && { echo "relayguard already on this machine"; exit 3; }
cd "$REPO"
echo "== install 1"
scripts/install.sh
echo "== status"
relayguard status --json
echo "== table"
nft list table inet relayguard >/dev/null && echo "table present"
echo "# the admin's own line" >> /etc/relayguard/relayguard.toml
echo "== install 2"
scripts/install.sh
echo "== status 2"
relayguard status --json
echo "== edited kept"
grep -c "the admin's own line" /etc/relayguard/relayguard.toml
ls /etc/relayguard
echo "== uninstall"
pid=$(cat /run/relayguard/relayguard.pid)
scripts/install.sh --uninstall
kill -0 "$pid" 2>/dev/null && echo "daemon still running" || echo "daemon gone"
ls -d /opt/relayguard /etc/relayguard /usr/local/bin/relayguard /etc/systemd/system/relayguard.service \
    /var/log/relayguard.log 2>/dev/null || true
ls /var/lib/relayguard
nft list table inet relayguard >/dev/null 2>&1 && echo "table left" || echo "table gone"
echo "== purge"
scripts/install.sh --purge
ls -d /var/lib/relayguard 2>/dev/null || echo "state gone"
echo "== done"
""".replace("OVERLAID", " ".join(OVERLAID))


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every wheel `pip install` of the project needs, its build backend included."""
    out = tmp_path_factory.mktemp("wheels")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "relayguard", src / "relayguard", ignore=shutil.ignore_patterns("__pycache__"))
    pip = ["/usr/bin/python3", "-m", "pip", "--disable-pip-version-check", "-q"]
    for argv in ([*pip, "wheel", "--wheel-dir", str(out), str(src)],
                 [*pip, "download", "--dest", str(out), "setuptools>=68", "wheel"]):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        assert p.returncode == 0, p.stderr
    return out


def _section(out: str, name: str) -> str:
    return out.split(f"== {name}\n", 1)[1].split("\n== ", 1)[0]


@pytest.mark.netns
def test_install_status_reinstall_uninstall_purge(tmp_path: Path, wheelhouse: Path) -> None:
    tmp_path.chmod(0o755)
    env = {"PATH": "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse)}
    argv = ["unshare", "--mount", "--propagation", "private", "--net", "--pid", "--fork", "--kill-child",
            "--mount-proc", "sh", "-c", SCRIPT, "install-test", str(tmp_path), str(ROOT)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, check=False)
    out = p.stdout
    assert p.returncode == 0 and "== done" in out, f"{out}\n{p.stderr}"

    assert "installed /etc/relayguard/relayguard.toml" in _section(out, "install 1")
    assert "relayguard is running in the background" in out and "kill $(cat /run/relayguard/relayguard.pid)" in out
    st = json.loads(_section(out, "status").strip().splitlines()[-1])
    src = st["sources"][0]
    # no /var/log/mail.log and no journald here: the default config waits for the mail log
    assert src["name"] == "/var/log/mail.log" and src["state"] == "missing"
    assert "table present" in _section(out, "table")

    again = _section(out, "install 2")
    assert "kept your /etc/relayguard/relayguard.toml" in again
    assert json.loads(_section(out, "status 2").strip().splitlines()[-1])["sources"][0]["state"] == "missing"
    kept = _section(out, "edited kept").split()
    assert kept[0] == "1" and "relayguard.toml.dist" in kept

    gone = _section(out, "uninstall")
    lines = gone.splitlines()
    assert "daemon gone" in lines and "table gone" in lines
    for path in ("/opt/relayguard", "/etc/relayguard", "/usr/local/bin/relayguard",
                 "/etc/systemd/system/relayguard.service", "/var/log/relayguard.log"):
        assert path not in lines  # `ls -d` names only what is left
    assert "relayguard.db" in lines and "relayguard.toml.saved" in lines
    assert "state gone" in _section(out, "purge")
    # the host saw nothing of it
    for path in ("/opt/relayguard", "/etc/relayguard", "/usr/local/bin/relayguard", "/var/lib/relayguard"):
        assert not Path(path).exists(), path


def test_print_config_picks_the_journal_and_it_checks(tmp_path: Path) -> None:
    for source, expect in (("journal", "source journal matching postfix, dovecot"),
                           ("file", "source /var/log/mail.log")):
        text = subprocess.run(["scripts/install.sh", "--print-config"], cwd=ROOT, capture_output=True, text=True,
                              check=True, env={"PATH": "/usr/bin:/bin", "RELAYGUARD_SOURCE": source}).stdout
        conf = tmp_path / f"{source}.toml"
        conf.write_text(text)
        out = subprocess.run([sys.executable, "-m", "relayguard", "config", "check", "--config", str(conf)],
                             capture_output=True, text=True, check=True).stdout
        assert expect in out and out.count("\nsource ") == 1
