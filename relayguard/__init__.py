"""relayguard: blocks the bots that hammer a mail server."""

__version__ = "0.1.0"
