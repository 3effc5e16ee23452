"""`python tests/audit_main.py ARGS` runs `relayguard ARGS` with the audit commands registered,
whether or not cli.py registers them itself yet (it calls cli_audit.register once it does)."""

from relayguard.cli import main
from relayguard.cli_audit import register

if "audit" not in main.commands:
    register(main)
main()
