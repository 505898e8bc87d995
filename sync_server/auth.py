"""Bearer tokens: JWT (HS256) with the claims ``tenant``, ``sub``, ``role`` and ``exp``.

PyJWT does the cryptography; this module turns its exceptions into ``Unauthorized``
and checks the claims Tether relies on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from protocol import Forbidden, Role, Unauthorized

__all__ = [
    "GLOBAL_TENANT",
    "RESERVED_TENANTS",
    "Principal",
    "bearer_token",
    "issue_token",
    "verify_token",
]

GLOBAL_TENANT = "*"
"""The tenant claim of an operator's admin token that reaches every tenant."""

RESERVED_TENANTS = frozenset({"tether.flags"})
"""Log tenants the server writes for itself (``sync_server.flags``): no token may hold
one, so no client can read their events."""

_ALGORITHM = "HS256"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for."""

    tenant: str
    subject: str
    role: Role

    @property
    def scope(self) -> str | None:
        """The tenant this principal is confined to; None for a global admin (tenant ``*``)."""
        if self.role is Role.ADMIN and self.tenant == GLOBAL_TENANT:
            return None
        return self.tenant

    def sees(self, tenant: str) -> bool:
        """Whether this principal may read or act on ``tenant``'s data."""
        return self.scope is None or self.scope == tenant

    @property
    def rate_key(self) -> str:
        """What rate limits count against: the token's tenant and subject.

        Never a client-chosen id: a fresh id per request would evade the limit, and
        another tenant's client id would let one tenant spend another's budget.
        """
        return f"{len(self.tenant)}:{self.tenant}:{self.subject}"

    def require(self, *roles: Role) -> None:
        """Raise ``Forbidden`` unless this principal has one of ``roles``."""
        if self.role not in roles:
            allowed = ", ".join(role.value for role in roles)
            raise Forbidden(f"role {self.role.value!r} may not do this (needs {allowed})")


def issue_token(
    secret: str,
    *,
    tenant: str,
    subject: str,
    role: Role | str = Role.CLIENT,
    ttl: float = 3600.0,
    now: float | None = None,
) -> str:
    """Sign a token.

    Args:
        secret: the server's HS256 secret (``SYNC_AUTH_SECRET``).
        tenant: whose data the token reaches.
        subject: who holds it (a client or service name).
        role: ``client``, ``source`` or ``admin``.
        ttl: seconds until it expires.
        now: the issue time (defaults to the clock).

    Returns:
        The encoded JWT.
    """
    issued = time.time() if now is None else now
    claims = {
        "tenant": tenant,
        "sub": subject,
        "role": Role(role).value,
        "iat": int(issued),
        "exp": int(issued + ttl),
    }
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


def verify_token(secret: str, token: str | None) -> Principal:
    """Check a token's signature, expiry and claims.

    Raises:
        Unauthorized: missing, malformed, wrongly signed or expired token, or bad claims.
    """
    if not token:
        raise Unauthorized("missing bearer token")
    try:
        claims = jwt.decode(
            token, secret, algorithms=[_ALGORITHM], options={"require": ["exp", "sub"]}
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("token expired") from exc
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid token: {exc}") from exc
    tenant, subject, role = claims.get("tenant"), claims.get("sub"), claims.get("role", "client")
    # NUL is refused: PostgreSQL cannot store it, so the claim could never match a row.
    if not isinstance(tenant, str) or not tenant or len(tenant) > 128 or "\x00" in tenant:
        raise Unauthorized("invalid token: bad tenant claim")
    if tenant in RESERVED_TENANTS:  # a log namespace of the server itself (flag audit)
        raise Unauthorized(f"invalid token: tenant {tenant!r} is reserved")
    if not isinstance(subject, str) or not subject or len(subject) > 128 or "\x00" in subject:
        raise Unauthorized("invalid token: bad sub claim")
    try:
        return Principal(tenant=tenant, subject=subject, role=Role(role))
    except ValueError as exc:
        raise Unauthorized(f"invalid token: unknown role {role!r}") from exc


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
