"""Bearer-key authentication for the /v1 API."""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from app.errors import unauthorized


class KeyChecker:
    def __init__(self, keys: list[SecretStr]) -> None:
        self._keys = [key.get_secret_value().encode() for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise a 401 unless the header carries one of the keys."""
        if not authorization:
            raise unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
        presented = token.strip().encode()
        # Compare against every key, without stopping early, so timing does not tell which one is close.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise unauthorized("Incorrect API key provided.")
