"""Bearer-key checks: the admin key for the registry, optional API keys for inference.

Each check reads the header through FastAPI's `HTTPBearer(auto_error=False)`, which declares the scheme in
the OpenAPI document (the Authorize button of `/docs`) and leaves every refusal to the checks here, so a
missing or wrong key is a 401 in OpenAI's shape with this module's codes.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from gateway.errors import Unauthorized

admin_bearer = HTTPBearer(
    scheme_name="AdminKey", auto_error=False,
    description="`PROMPTINTERN_ADMIN_KEY`: every `/v1/prompts` route, reads included.",
)
api_bearer = HTTPBearer(
    scheme_name="APIKey", auto_error=False,
    description="One of `PROMPTINTERN_API_KEYS` when the gateway sets any (inference is open otherwise).",
)
AdminCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer)]
APICredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(api_bearer)]


def _matching(credentials: HTTPAuthorizationCredentials | None, keys: list[SecretStr]) -> int | None:
    """The index of the key the header carries, compared in constant time per key (any bytes a client sends
    are safe); None if none. The ASGI server decodes header bytes as latin-1, so encoding back to latin-1
    gives the bytes as sent."""
    if credentials is None:
        return None
    sent = credentials.credentials.encode("latin-1")
    found = None
    for i, key in enumerate(keys):  # every key is compared: the time does not tell which one matched
        if hmac.compare_digest(sent, key.get_secret_value().encode("utf-8")) and found is None:
            found = i
    return found


def _matches(credentials: HTTPAuthorizationCredentials | None, keys: list[SecretStr]) -> bool:
    return _matching(credentials, keys) is not None


async def require_api_key(request: Request, credentials: APICredentials) -> None:
    """Check the API key (when the gateway has any) and note its tenant in `request.state.tenant`."""
    pairs = request.app.state.settings.tenant_keys
    request.state.tenant = None
    if not pairs:
        return
    found = _matching(credentials, [key for _, key in pairs])
    if found is None:
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
    request.state.tenant = pairs[found][0]


def request_tenant(request: Request) -> str | None:
    """The tenant of the request's API key (None: no tenant, or the gateway has no API keys)."""
    return getattr(request.state, "tenant", None)


async def require_admin(request: Request, credentials: AdminCredentials) -> None:
    key = request.app.state.settings.admin_key
    if not key:
        raise Unauthorized("the registry API is disabled: PROMPTINTERN_ADMIN_KEY is not set", code="admin_disabled")
    if not _matches(credentials, [key]):
        raise Unauthorized("the registry API needs 'Authorization: Bearer $PROMPTINTERN_ADMIN_KEY'",
                           code="invalid_admin_key")
