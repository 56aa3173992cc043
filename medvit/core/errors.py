"""User-facing errors.

Anything a user can cause with a bad file, folder, config or checkpoint raises a
:class:`MedvitError`. The CLI prints its message as one line and exits with status 2;
every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class MedvitError(Exception):
    """An error caused by the user's input; its message is one self-contained line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputError(MedvitError):
    """A bad input file or folder: the message names the path and the problem."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class ConfigError(MedvitError):
    """A bad config file: the message names the file and the key."""


class CheckpointError(MedvitError):
    """A checkpoint that cannot be read or does not fit the net it is loaded into."""


class NonFiniteOutput(MedvitError):
    """A net returned NaN or inf (the engine names the window or tile); in training, divergence."""


@contextlib.contextmanager
def about(path: str | Path, note: str = "") -> Iterator[None]:
    """A :class:`MedvitError` raised inside that names no file (the engine's, say) becomes an
    :class:`InputError` about ``path``, with ``note`` appended; an InputError passes unchanged."""
    try:
        yield
    except InputError:
        raise
    except MedvitError as e:
        raise InputError(path, f"{e}{note}") from None


def listed(items, shown: int = 10) -> str:
    """``items`` for a one-line message: the first ``shown``, then how many there are ("none" if empty)."""
    items = [str(v.item()) if hasattr(v, "item") else str(v) for v in items]  # numpy scalars print bare
    return ", ".join(items[:shown]) + (f", ... ({len(items)} in all)" if len(items) > shown else "") or "none"
