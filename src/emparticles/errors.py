"""Errors raised on user input: each names the file and what to do about it."""

from __future__ import annotations

from pathlib import Path


class EmparticlesError(Exception):
    """Base class for problems a user can fix."""


class InputError(EmparticlesError):
    """A file or option that cannot be used as given.

    Parameters
    ----------
    path : the offending file (or ``None`` for a bad option).
    problem : what is wrong, in one sentence.
    fix : what the user can do about it.
    """

    def __init__(self, path: str | Path | None, problem: str, fix: str = ""):
        self.path = None if path is None else Path(path)
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path is not None else ""
        hint = f" Fix: {fix}" if fix else ""
        super().__init__(f"{where}{problem}.{hint}")
