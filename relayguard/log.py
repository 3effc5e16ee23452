"""structlog set-up, once, at start: JSON lines for journald and pipes, readable console output on a TTY.

Events are named in snake_case past tense (`ban_applied`, `ban_expired`, `config_reloaded`) and carry
their facts as fields; see docs/operations.md for the list.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def wants_json(fmt: Literal["auto", "console", "json"]) -> bool:
    if fmt != "auto":
        return fmt == "json"
    # systemd sets JOURNAL_STREAM for services whose stdout goes to the journal
    return bool(os.environ.get("JOURNAL_STREAM")) or not sys.stderr.isatty()


def configure(fmt: Literal["auto", "console", "json"] = "auto", level: str = "info") -> None:
    renderer: structlog.typing.Processor
    if wants_json(fmt):
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
