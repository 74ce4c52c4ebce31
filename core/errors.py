"""Domain errors: what went wrong, in the system's own terms. The gateway maps them to HTTP in one place
(`gateway/errors.py`); the trainer and the registry never know about status codes."""

from __future__ import annotations


class DomainError(Exception):
    """An error a caller can act on; `param` names the offending input, `code` is a stable machine-readable id."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class NotFoundError(DomainError):
    """The named thing (prompt, version, job) does not exist."""


class ConflictError(DomainError):
    """The change collides with the current state (a name taken, a version already published)."""


class InvalidInput(DomainError):
    """The input is well-formed but cannot be accepted (a bad template, rows, schedule or adapter)."""


class InvalidAdapter(InvalidInput):
    """An adapter folder that is not a loadable PEFT LoRA adapter for this base model."""
