"""The base of every expected failure: its message is one line that names the file and the cause."""

from __future__ import annotations


class RelabelError(Exception):
    """An expected failure (bad input, missing weights, mismatched store, ...).

    The CLI prints it as one line without a traceback and exits with :attr:`exit_code`
    (1 by default; 2 for usage errors).
    """

    exit_code: int = 1


class UsageError(RelabelError):
    """Wrong options or arguments: exit code 2."""

    exit_code = 2


class Interrupted(RelabelError):
    """Ctrl-C (SIGINT): the message says what was kept; exit code 130, as shells report SIGINT."""

    exit_code = 130
