"""API keys: ``Authorization: Bearer <key>``, compared in constant time, never logged.

Every mutating endpoint depends on ``require_api_key`` (use the ``ApiKey`` alias)::

    @router.post("/v1/fine_tuning/jobs", responses=error_responses(401, 422))
    def create_job(body: JobRequest, caller: ApiKey) -> Job: ...

With no keys configured (``ADVISOR_API_KEYS`` empty) mutating endpoints refuse every call: a
server that forgot its keys must fail closed, not open.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from advisor.api.errors import ApiError

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="an API key from ADVISOR_API_KEYS, as `Authorization: Bearer <key>`",
)

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="tuneadvisor"'}


@dataclass(frozen=True)
class Caller:
    """Who called: a fingerprint of the key (not the key), fit for audit records."""

    key_id: str


def _digest(key: str) -> bytes:
    # hashing first gives equal-length inputs, so compare_digest leaks nothing about key lengths
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def match_key(presented: str, keys: list[str]) -> str | None:
    """The key id of the configured key equal to `presented`, checking every key (constant time)."""
    given = _digest(presented)
    found: str | None = None
    for key in keys:
        digest = _digest(key)
        if hmac.compare_digest(given, digest):
            found = "key_" + digest.hex()[:12]
    return found


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Caller:
    """FastAPI dependency: 401 unless the request carries a configured API key."""
    keys = [k.get_secret_value() for k in request.app.state.settings.api_keys]
    if not keys:
        raise ApiError(
            401, "auth_not_configured", "this server has no API keys: set ADVISOR_API_KEYS", headers=_CHALLENGE
        )
    if credentials is None or not credentials.credentials:
        raise ApiError(401, "unauthorized", "missing API key: send `Authorization: Bearer <key>`", headers=_CHALLENGE)
    key_id = match_key(credentials.credentials, keys)
    if key_id is None:
        raise ApiError(401, "unauthorized", "invalid API key", headers=_CHALLENGE)
    return Caller(key_id=key_id)


#: The dependency alias routers use for mutating endpoints.
ApiKey = Annotated[Caller, Depends(require_api_key)]
