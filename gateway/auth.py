"""Bearer-key checks: the admin key for the registry, optional API keys for inference."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from gateway.errors import Unauthorized


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, keys: list[SecretStr]) -> bool:
    """Constant-time comparison of the header's bytes with the UTF-8 key (any bytes a client sends are safe).

    The ASGI server decodes header bytes as latin-1, so encoding back to latin-1 gives the bytes as sent.
    """
    if token is None:
        return False
    sent = token.encode("latin-1")
    return any(hmac.compare_digest(sent, key.get_secret_value().encode("utf-8")) for key in keys)


async def require_api_key(request: Request) -> None:
    keys = request.app.state.settings.api_keys
    if keys and not _matches(_bearer(request), keys):
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")


async def require_admin(request: Request) -> None:
    key = request.app.state.settings.admin_key
    if not key:
        raise Unauthorized("the registry API is disabled: PROMPTINTERN_ADMIN_KEY is not set", code="admin_disabled")
    if not _matches(_bearer(request), [key]):
        raise Unauthorized("the registry API needs 'Authorization: Bearer $PROMPTINTERN_ADMIN_KEY'",
                           code="invalid_admin_key")
