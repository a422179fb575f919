# -*- test-case-name: tests.test_suppression, tests.test_cli_queue, tests.test_webhook -*-
"""What every `mailrelay` subcommand shares: exit statuses, the one-line error, loading the config.

A subcommand never shows a traceback: a user error, an OS error or a bug each end as one line on
standard error, `PROG: what went wrong`, and an exit status (0 done, 1 failed, 2 the config).
"""
from __future__ import annotations

import sys
from typing import Callable

from mailrelay.config import Config, ConfigError, load

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class CLIError(Exception):
    """A failure to report in one line, with the exit status it means."""

    def __init__(self, message: str, status: int = EXIT_FAILED):
        super().__init__(message)
        self.status = status


def error(prog: str, text: str) -> None:
    print(f"{prog}: {text}", file=sys.stderr)


def load_config(config_path: str) -> Config:
    """The config at `config_path`; CLIError (EXIT_CONFIG) with the loader's one line otherwise."""
    try:
        return load(config_path)
    except ConfigError as e:
        raise CLIError(str(e), EXIT_CONFIG) from None
    except Exception as e:   # a loader bug must still be one line and a config failure
        raise CLIError(f"{config_path}: cannot load: {e.__class__.__name__}: {' '.join(str(e).split())}",
                       EXIT_CONFIG) from None


def guarded(prog: str, what: str, action: Callable[[], int]) -> int:
    """`action()`'s exit status, or the status of the failure it raised, reported in one line;
    `what` names the file an OSError without a file name was about."""
    try:
        return action()
    except CLIError as e:
        error(prog, str(e))
        return e.status
    except OSError as e:
        error(prog, f"{e.filename or what}: {e.strerror or e}")
        return EXIT_FAILED
    except Exception as e:   # a bug, not a user error: still one line, never a traceback
        error(prog, f"unexpected error: {e.__class__.__name__}: {' '.join(str(e).split())}")
        return EXIT_FAILED
