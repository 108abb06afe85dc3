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
