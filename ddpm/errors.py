"""User-facing errors and the exit codes every command line entry point shares.

A :class:`DDPMError` is bad input (a config typo, a missing dataset, a corrupt
checkpoint, a missing shard): entry points print its message as one line, with
no traceback, and exit with :data:`EXIT_USER_ERROR` before doing any work.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_REQUEUE = 3  # stopped early on a signal after a durable checkpoint: "requeue me"

F = TypeVar("F", bound=Callable[..., int | None])


class DDPMError(Exception):
    """Bad input a user can fix; the message names the thing that is wrong."""


class ConfigError(DDPMError):
    """An invalid config file, key, value or override."""


class DataError(DDPMError):
    """A missing or unreadable dataset, image, column or split."""


class CheckpointError(DDPMError):
    """A missing, corrupt or truncated checkpoint."""


class ShardError(DDPMError):
    """A missing, overlapping or inconsistent sample shard."""


class FIDError(DDPMError):
    """Missing or mismatched Inception weights, or statistics that cannot be compared."""


def cli_entry(main: F) -> Callable[..., int]:
    """Wrap a ``main(argv) -> exit code`` so a :class:`DDPMError` prints one line and exits 2."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> int:
        try:
            code = main(*args, **kwargs)
        except DDPMError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return EXIT_OK if code is None else int(code)

    return wrapper
