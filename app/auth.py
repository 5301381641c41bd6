"""Bearer-key authentication for the /v1 API."""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr

from app.errors import unauthorized


class KeyChecker:
    def __init__(self, keys: list[SecretStr]) -> None:
        self._keys = [key.get_secret_value().encode() for key in keys]
        # What stored objects record as their owner: the key itself must not be kept with them.
        self._owners = [hashlib.sha256(key).hexdigest()[:32] for key in self._keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str:
        """The owner fingerprint of the key the header carries; a 401 unless it carries one of the keys."""
        if not authorization:
            raise unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
        presented = token.strip().encode()
        # Compare against every key, without stopping early, so timing does not tell which one is close.
        owner = ""
        for key, fingerprint in zip(self._keys, self._owners, strict=True):
            if hmac.compare_digest(presented, key):
                owner = fingerprint
        if not owner:
            raise unauthorized("Incorrect API key provided.")
        return owner
