"""Bearer-key authentication for the /v1 endpoints.

Keys come from ``--api_key`` and/or ``--api_key_file`` (one per line; blank lines and ``#``
comments skipped). With no key configured the server is open, which is why ``--host`` defaults to
127.0.0.1. Keys are compared in constant time so a wrong key's timing reveals nothing.
"""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Iterable, Optional

from lmforge.serve.errors import APIError


def load_api_keys(api_key: Optional[str] = None, api_key_file: Optional[str] = None) -> list[str]:
    """All accepted keys; raises ValueError for an unreadable or empty key file."""
    keys = [api_key.strip()] if api_key and api_key.strip() else []
    if api_key_file:
        path = Path(api_key_file)
        if not path.is_file():
            raise ValueError(f"--api_key_file {api_key_file!r}: no such file")
        from_file = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        from_file = [k for k in from_file if k and not k.startswith("#")]
        if not from_file:
            raise ValueError(f"--api_key_file {api_key_file!r} holds no key (one per line expected)")
        keys += from_file
    return keys


class BearerAuth:
    """Checks ``Authorization: Bearer KEY`` against the accepted keys (no keys: everything passes)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode("utf-8") for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: Optional[str]) -> None:
        if not self._keys:
            return
        if not authorization:
            raise _unauthorized("Missing API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("Malformed Authorization header: expected 'Bearer <key>'")
        given = token.strip().encode("utf-8", "surrogateescape")
        ok = False
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise _unauthorized("Incorrect API key provided")


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
