"""Small helpers shared by the model families."""
from __future__ import annotations

import inspect


def constructor_kwargs(cls: type, kwargs: dict) -> dict:
    """The entries of ``kwargs`` that ``cls.__init__`` accepts."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}
