"""The exception a spec's mistakes raise."""

from __future__ import annotations

from typing import Any, Dict, List


class SpecError(ValueError):
    """A spec that does not compile (or data that does not fit it).

    ``str(e)`` is the located diagnostic the ``aec`` command prints; ``e.diagnostics`` holds each
    one as a dict: ``severity``, ``message``, ``file``, ``line``, ``column`` (1-based), ``label``,
    ``help`` and ``notes``.
    """

    def __init__(self, message: str, diagnostics: List[Dict[str, Any]]):
        super().__init__(message)
        self.diagnostics = diagnostics
