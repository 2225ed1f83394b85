"""The owner agent's errors, as types: the CLI prints them as one clear line, by type.

Anything else escaping a command is a bug and keeps its traceback.
"""
from __future__ import annotations


class OwnerError(Exception):
    """A problem the owner can act on; the message says what and, where it helps, how."""


class ServiceError(OwnerError):
    """The cloud service refused the request or could not be reached (upload, task, predict)."""


class OutboxError(OwnerError):
    """An outbox folder cannot be written or read as asked (exists, incomplete, wrong key or task)."""


class TaskMismatch(OwnerError):
    """The server's task does not fit what the owner asked for (plain vs key, scheme, classes)."""
