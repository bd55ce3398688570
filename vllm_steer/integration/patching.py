"""The one way the plugin wraps a vLLM function: ``@patch(owner, name)``.

    @patch(Scheduler, "schedule")
    def schedule(original, self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        ...
        return out

The decorated function gets the original as its first argument. The wrapper keeps the original's
name, docstring and signature (``functools.wraps``), so ``compat`` still reads the original's
parameters. Patching is idempotent (a second ``install`` in the same process changes nothing), and
static and class methods stay what they were.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

MARK = "_vllm_steer"


def is_patched(owner: Any, name: str) -> bool:
    return getattr(getattr(owner, name, None), MARK, False)


def patch(owner: Any, name: str) -> Callable[[Callable], Callable]:
    def decorate(replacement: Callable) -> Callable:
        raw = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name)
        if raw is None:  # inherited: wrap what the class sees
            raw = getattr(owner, name)
        kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
        original = raw.__func__ if kind is not None else raw
        if getattr(original, MARK, False):
            return replacement

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            return replacement(original, *args, **kwargs)

        setattr(wrapper, MARK, True)
        setattr(owner, name, kind(wrapper) if kind is not None else wrapper)
        return replacement

    return decorate
