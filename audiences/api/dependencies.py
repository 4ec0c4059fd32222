"""What every route shares: the caller (authenticated key and its environment), the rate limit,
the idempotent write, and the bodies parsed by pydantic-core.

The app's state holds the environments and the rate limiter (`create_app` sets them), so these
dependencies are plain functions of the request.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter, ValidationError
from pydantic_core import from_json
from starlette.concurrency import run_in_threadpool

from audiences.api import idempotency
from audiences.api.errors import ApiError, invalid
from audiences.api.keys import ApiKey, find_key, key_environments
from audiences.api.limits import retry_after_header
from audiences.api.models import MEMBERS_ADAPTER
from audiences.api.service import Environment

bearer = HTTPBearer(
    auto_error=False, description="A secret key: `audiences keys create --environment ...`"
)


@dataclass(frozen=True)
class Caller:
    key: ApiKey
    environment: Environment


def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    """The caller a secret key names; 401 in Knock's shape when there is none."""
    environments = request.app.state.environments
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError(401, "api_key_missing", "send a secret key as `Authorization: Bearer <key>`")
    # Only the store of the environment the key names is asked, and only for a key made for
    # that environment: a key works in its own environment and nowhere else.
    secret = credentials.credentials
    for name in key_environments(secret, environments):
        key = find_key(environments[name].store, secret, name)
        if key is not None:
            return Caller(key, environments[name])
    raise ApiError(
        401,
        "authentication_required",
        "the key does not exist, was revoked, or belongs to an environment this server does not serve",
    )


def limited(kind: str) -> Callable[..., Caller]:
    """A dependency: the authenticated caller, within the rate limit of the endpoint's tier
    (`kind`: "read", "write", "delete" or "bulk", Knock's tiers 4, 3, 2 and 1). As Knock scopes
    them, limits are per environment, not per key: a second key does not double the rate."""

    # Async, so FastAPI runs it on the event loop: the key lookup is one indexed read, cheaper
    # than handing the request to a worker thread and back.
    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Caller:
        caller = authenticate(request, credentials)
        check_rate(request, caller, kind)
        return caller

    return dependency


def check_rate(request: Request, caller: Caller, kind: str) -> None:
    """Take one request from the caller's environment's `kind` bucket, or answer 429."""
    limiter = request.app.state.limiter
    wait = limiter.acquire(caller.environment.name, kind)
    if wait is not None:
        raise ApiError(
            429,
            "rate_limit_exceeded",
            f"over the {caller.environment.name} environment's limit of "
            f"{limiter.rates[kind]:g} {kind} requests a second",
            headers={"Retry-After": retry_after_header(wait)},
        )


Reader = Annotated[Caller, Depends(limited("read"))]
Writer = Annotated[Caller, Depends(limited("write"))]
Deleter = Annotated[Caller, Depends(limited("delete"))]  # deletes and merges: Knock's tier 2
BulkWriter = Annotated[Caller, Depends(limited("bulk"))]  # bulk operations: Knock's tier 1


def _parameters(content_type: str | None, body: bytes) -> bytes:
    """A request body as its parameters, for comparing two requests with one Idempotency-Key
    (Knock: "mismatched parameters produce an error"): a JSON body as its parsed value (so that
    whitespace and key order do not count), any other body (an upload's CSV) as its bytes."""
    if content_type is None or content_type.split(";")[0].strip().lower() != "application/json":
        return body
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return body
    return b"json:" + json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()


async def write(
    request: Request,
    caller: Caller,
    status: int,
    work: Callable[[idempotency.Claim | None], Any],
) -> Response:
    """Run a write, `work(claim)`, which answers `status` with the body it returns. With an
    `Idempotency-Key`, the claim goes into the write's transaction (idempotency.py), and the
    first 2xx answer is replayed for 24 hours."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return respond(status, await run_in_threadpool(work, None))
    if not key or len(key) > 255:
        raise invalid("Idempotency-Key", "between 1 and 255 characters")
    digest = hashlib.sha256(
        b"\x1f".join(
            [
                request.method.encode(),
                request.url.path.encode(),
                urlencode(sorted(parse_qsl(request.url.query, keep_blank_values=True))).encode(),
                _parameters(request.headers.get("content-type"), await request.body()),
            ]
        )
    ).hexdigest()
    claim = idempotency.Claim(caller.key.key_id, key, digest, request.state.request_id, status)
    try:
        replay = await run_in_threadpool(idempotency.find, caller.environment.store, claim)
        if replay is None:
            return respond(status, await run_in_threadpool(work, claim))
    except idempotency.Replayed as replayed:
        replay = replayed.replay
    return respond(
        replay.status_code,
        replay.body,
        {"idempotent-replayed": "true", "original-x-request-id": replay.request_id},
    )


async def members_body(request: Request, from_query: bool = False) -> dict:
    raw = await request.body()
    if from_query and not raw.strip() and "members" in request.query_params:
        try:
            # pydantic-core's parser, like the body's: it refuses nesting too deep for the stack
            # (`json.loads` raised RecursionError, a 500).
            members = from_json(request.query_params["members"])
        except ValueError as error:
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("query", "members"),
                        "msg": str(error),
                        "ctx": {"error": str(error)},
                    }
                ]
            ) from None
        try:
            return MEMBERS_ADAPTER.validate_python({"members": members})
        except ValidationError as error:
            raise RequestValidationError(
                [
                    {**problem, "loc": ("body", *problem["loc"])}
                    for problem in error.errors(include_url=False)
                ]
            ) from None
    return await parsed_body(
        request,
        MEMBERS_ADAPTER,
        "the request has no body; send the members in it"
        + (", or as a `members` query parameter" if from_query else ""),
    )


async def parsed_body(request: Request, adapter: TypeAdapter, missing: str = "") -> Any:
    """The request's JSON body, parsed and validated by pydantic-core in one step, whatever its
    content type says. An empty body is `invalid_json` too, with `missing` saying what to send."""
    raw = await request.body()
    if not raw.strip():
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body",),
                    "msg": "no body",
                    "ctx": {"error": missing or "the request has no body; send a JSON object"},
                }
            ]
        )
    try:
        return adapter.validate_json(raw)
    except ValidationError as error:
        raise RequestValidationError(
            [
                {**problem, "loc": ("body", *problem["loc"])}
                for problem in error.errors(include_url=False)
            ]
        ) from None


def respond(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    if status == 204 or body is None:
        return Response(status_code=status, headers=headers)
    return JSONResponse(body, status_code=status, headers=headers)
