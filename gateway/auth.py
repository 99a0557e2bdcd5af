"""Principals and token checks.

Tokens are stored only as SHA-256 hashes; a presented token is hashed and compared in
constant time. Tokens never reach a log line: the access log scrubs ``token=`` from URLs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from gateway.clock import now_iso
from gateway.errors import AuthenticationRequired
from gateway.jwt_auth import looks_like_jwt
from gateway.store import Store

ROLES = ("agent", "reviewer", "admin")
RELOAD_INTERVAL = 1.0


@dataclass(frozen=True)
class Principal:
    """Who is calling: a name (recorded on every session, step and event) and a role."""

    name: str
    role: str  # what it may do: gateway.access


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class TokenAuthority:
    """Maps tokens to principals. Created once per server; consulted on every request."""

    def __init__(self, store: Store, configured_admin_token: str | None = None, jwt: Any = None,
                 configured_admin_hash: str | None = None):
        self.store = store
        self.jwt = jwt
        self._configured: list[tuple[str, Principal]] = []
        if configured_admin_token:
            self._configured.append((hash_token(configured_admin_token), Principal("admin", "admin")))
        if configured_admin_hash:
            self._configured.append((configured_admin_hash.lower(), Principal("admin", "admin")))
        self._by_hash: dict[str, Principal] = {}
        self._reloaded_at = 0.0
        self.reload()

    def reload(self) -> None:
        """Re-read the stored tokens (after one is created or revoked, here or by the CLI)."""
        self._reloaded_at = time.monotonic()
        self._last_token_id = self.store.last_token_id()
        self._by_hash = {row["token_hash"]: Principal(row["name"], row["role"]) for row in self.store.active_tokens()}
        for digest, principal in self._configured:
            self._by_hash[digest] = principal

    def has_tokens(self) -> bool:
        return bool(self._by_hash)

    def create(self, name: str, role: str) -> str:
        """Store a new token for ``name``; returns the token itself, which is shown once."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        token = new_token()
        self.store.add_token(name=name, role=role, token_hash=hash_token(token), created_at=now_iso())
        self.reload()
        return token

    def revoke(self, *, name: str | None = None, token_id: int | None = None) -> int:
        """Revoke the tokens of a principal (or one token by id); returns how many."""
        count = self.store.revoke_tokens(name=name, token_id=token_id, at=now_iso())
        self.reload()
        return count

    def authenticate(self, token: str | None) -> Principal:
        """The principal a token belongs to; raises ``AuthenticationRequired`` otherwise."""
        if not token:
            raise AuthenticationRequired(
                "This request needs a token: send 'Authorization: Bearer <token>' (or 'token <token>', or ?token=).",
                code="missing_token")
        if self.jwt is not None and looks_like_jwt(token):
            name, role = self.jwt.principal(token)
            return Principal(name, role)
        if time.monotonic() - self._reloaded_at > RELOAD_INTERVAL:
            # Tokens created or revoked by the command line while the server runs count within a second.
            self.reload()
        digest = hash_token(token)
        found = self._match(digest)
        if found is None and self.store.last_token_id() != self._last_token_id:
            # A token created a moment ago (by the command line).
            self.reload()
            found = self._match(digest)
        if found is None:
            raise AuthenticationRequired("The token is not valid. Check it, or ask an admin for a new one.",
                                         code="invalid_token")
        return found

    def _match(self, digest: str) -> Principal | None:
        found: Principal | None = None
        for known, principal in self._by_hash.items():
            # Every known hash is compared, in constant time, whatever matched.
            if hmac.compare_digest(known, digest):
                found = principal
        return found
