"""User-facing errors: the CLI prints these as one clear message, without a traceback."""

from __future__ import annotations

from pathlib import Path


class CryoflexError(Exception):
    """An error the user can act on: names the file, the field, the problem and the fix."""

    def __init__(self, path: str | Path | None, problem: str, fix: str | None = None, field: str | None = None):
        self.path = None if path is None else str(path)
        self.field = field
        self.problem = problem
        self.fix = fix
        where = self.path or "input"
        if field:
            where += f" [{field}]"
        message = f"{where}: {problem}"
        if fix:
            message += f"\n  fix: {fix}"
        super().__init__(message)


class CryoflexInputError(CryoflexError):
    """Bad input from the user: names the file, the field and the fix (CLI exit code 2)."""


class CryoflexOutputError(CryoflexError):
    """An output that could not be written (e.g. the disk is full): names the file, the cause and the fix (exit 1)."""


def numpy_load_problem(error: Exception) -> str:
    """Why numpy could not load a file, for an error message: numpy's own advice for files of Python objects (load
    them with allow_pickle) would run code from the file, which cryoflex never does, so it is not passed on."""
    text = str(error)
    if "allow_pickle" in text or "pickled" in text:
        return "not a numpy file of plain arrays (it is text, or holds Python objects, which cryoflex never loads)"
    return text
