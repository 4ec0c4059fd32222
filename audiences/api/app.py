"""The HTTP service: Knock's public API shapes for audiences and users, plus our extensions.

`audiences serve` runs it under uvicorn. Routes are thin: they validate the request (pydantic, which
also makes the OpenAPI document at `/openapi.json`), authenticate the key, apply the rate limit and
the idempotency key, and call `Environment` (service.py), which calls the same functions the
command-line tool does. Every error is Knock's shape (errors.py); bad input never gets a 500.
"""

import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Required

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from pydantic_core import from_json
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from typing_extensions import TypedDict

from audiences.api import idempotency
from audiences.api.errors import ApiError, ErrorBody, error_body, invalid
from audiences.api.keys import ApiKey, StoreEnvironmentError, find_key, key_environments, safe_url
from audiences.api.limits import BodyLimit, RateLimiter, retry_after_header
from audiences.api.service import Environment, tenant_of
from audiences.settings import Settings
from audiences.static.members import MAX_MEMBERS_PER_CALL

log = logging.getLogger("audiences.api")


# -- request and response shapes ------------------------------------------------------------------

# An identifier is not blank (ASCII whitespace only) and holds no NUL; spelled out with an explicit
# character set so that the OpenAPI document and the validation agree on it. Path parameters are
# checked by the same pattern (and decoded paths hold no lone surrogates).
IDENTIFIER_PATTERN = r"^[^\x00]*[^\x00\t\n\x0b\x0c\r ][^\x00]*$"
TEXT_PATTERN = r"^[^\x00]*$"


# pydantic refuses lone surrogates in `str` fields itself; the patterns refuse NUL.
Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=IDENTIFIER_PATTERN)
]
Tenant = Annotated[str, StringConstraints(max_length=255, pattern=TEXT_PATTERN)]
Text = Annotated[str, StringConstraints(pattern=TEXT_PATTERN)]
AudienceKey = Annotated[
    str,
    Path(
        pattern=r"^[a-z0-9_-]{1,255}$",
        description="The audience key: lower-case letters, digits, '-' and '_'.",
    ),
]
GuideKey = Annotated[
    str, Path(pattern=r"^[a-z0-9_-]{1,255}$", description="The guide key (its folder's name).")
]
UserId = Annotated[
    str, Path(pattern=IDENTIFIER_PATTERN, max_length=255, description="The user's id.")
]


# Request bodies are TypedDicts: validated as strictly as models (and described the same way in
# the OpenAPI document), but without building two model objects per member, which made validation
# the largest cost of a 1,000-member add.
class UserProperties(TypedDict, total=False):
    """Knock's user fields; any other property is a custom property (nested objects too).
    Properties are merged into the user's (a `null` removes one), as Knock's identify does."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    name: Text | None
    email: Text | None
    phone_number: Text | None
    avatar: Text | None
    locale: Text | None
    timezone: Text | None
    created_at: Text | None


class InlineIdentifyUser(UserProperties, total=False):
    """Knock's `InlineIdentifyUserRequest`: `id` is required."""

    id: Required[Identifier]


class AudienceMemberRequest(TypedDict, total=False):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    user: Required[InlineIdentifyUser]
    tenant: Tenant | None


class AudienceMembersRequest(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    members: Annotated[
        list[AudienceMemberRequest],
        Field(
            max_length=MAX_MEMBERS_PER_CALL,
            description="Up to 1,000 members per request (Knock's limit).",
        ),
    ]


class User(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    typename: str = Field("User", alias="__typename")
    id: str
    updated_at: str


class AudienceMember(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    typename: str = Field("AudienceMember", alias="__typename")
    added_at: str
    user_id: str
    tenant: str | None
    user: User


class PageInfo(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    typename: str = Field("PageInfo", alias="__typename")
    page_size: int
    after: str | None
    before: str | None


class AudienceMembersPage(BaseModel):
    entries: list[AudienceMember]
    page_info: PageInfo


class Membership(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    typename: str = Field("AudienceMembership", alias="__typename")
    audience_key: str
    user_id: str
    tenant: str | None
    member: bool = Field(
        description="Tenant-strict: the membership's tenant equals the requested one "
        "(no tenant requested: only a membership without tenant counts)."
    )


class GuideEligibility(BaseModel):
    guide_key: str
    user_id: str
    tenant: str | None
    eligible: bool
    reason: str


class BroadcastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workflow: Identifier = Field(description="The workflow key each member's trigger names.")
    data: dict[str, Any] = Field(default_factory=dict)
    tenant: Tenant | None = Field(None, description="Only members with this tenant.")
    sink: Identifier | None = Field(
        None, description="A sink of sinks.yml (default: its default sink)."
    )
    broadcast_id: Identifier | None = Field(
        None, description="Default: a hash of the broadcast's content."
    )


class BroadcastResult(BaseModel):
    broadcast_id: str
    recipients: int
    new_deliveries: int


ERRORS = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        401: "No key, or a key that does not exist or was revoked.",
        404: "No such audience, user or guide.",
        413: "The request body is over the limit.",
        422: "Bad input; `errors` names the field.",
        429: "Over the key's rate limit; `Retry-After` says when to retry.",
    }.items()
}


# -- the application ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    key: ApiKey
    environment: Environment


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    environments = open_environments(settings)
    limiter = RateLimiter(
        {"write": settings.api_write_rate, "read": settings.api_read_rate},
        settings.duckdb_path.parent / "api-rate-limits.bin",
    )
    bearer = HTTPBearer(
        auto_error=False, description="A secret key: `audiences keys create --environment ...`"
    )

    app = FastAPI(
        title="Audiences engine API",
        version="1",
        description="Knock's public Audiences and Users API shapes (so Knock's SDKs and reverse-ETL tools "
        "work against it), plus membership checks, guide eligibility and broadcasts.",
    )
    app.state.environments = environments
    app.state.limiter = limiter

    def authenticate(credentials: HTTPAuthorizationCredentials | None) -> Caller:
        if (
            credentials is None
            or credentials.scheme.lower() != "bearer"
            or not credentials.credentials
        ):
            raise ApiError(
                401, "unauthenticated", "send a secret key as `Authorization: Bearer <key>`"
            )
        # Only the store of the environment the key names is asked, and only for a key made for
        # that environment: a key works in its own environment and nowhere else.
        secret = credentials.credentials
        for name in key_environments(secret, environments):
            key = find_key(environments[name].store, secret, name)
            if key is not None:
                return Caller(key, environments[name])
        raise ApiError(
            401,
            "unauthenticated",
            "the key does not exist, was revoked, or belongs to an environment this server does not serve",
        )

    def limited(kind: str) -> Callable[..., Caller]:
        # Async, so FastAPI runs it on the event loop: the key lookup is one indexed read, cheaper
        # than handing the request to a worker thread and back.
        async def dependency(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        ) -> Caller:
            caller = authenticate(credentials)
            wait = limiter.acquire(caller.key.key_id, kind)
            if wait is not None:
                raise ApiError(
                    429,
                    "rate_limit_exceeded",
                    f"over this key's limit of {limiter.rates[kind]:g} {kind}s a second",
                    headers={"Retry-After": retry_after_header(wait)},
                )
            return caller

        return dependency

    Reader = Annotated[Caller, Depends(limited("read"))]
    Writer = Annotated[Caller, Depends(limited("write"))]

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
                    request.url.query.encode(),
                    await request.body(),
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

    # -- audiences ---------------------------------------------------------------------------------

    @app.post(
        "/v1/audiences/{key}/members",
        status_code=204,
        responses=ERRORS,
        tags=["audiences"],
        summary="Add members (inline identify upserts the users)",
        openapi_extra=MEMBERS_BODY,
    )
    async def add_members(
        key: AudienceKey,
        request: Request,
        caller: Writer,
        create_audience: bool = Query(False, description="Create a missing static audience."),
    ):
        body = await members_body(request)
        return await write(
            request,
            caller,
            204,
            lambda claim: caller.environment.change_members(
                key, body["members"], "add", create_audience, claim=claim
            ),
        )

    @app.delete(
        "/v1/audiences/{key}/members",
        status_code=204,
        responses=ERRORS,
        tags=["audiences"],
        summary="Remove members (in the body, or as a `members` query parameter)",
        openapi_extra=REMOVE_MEMBERS,
    )
    async def remove_members(key: AudienceKey, request: Request, caller: Writer):
        body = await members_body(request, from_query=True)
        return await write(
            request,
            caller,
            204,
            lambda claim: caller.environment.change_members(
                key, body["members"], "remove", claim=claim
            ),
        )

    @app.get(
        "/v1/audiences/{key}/members",
        response_model=AudienceMembersPage,
        responses=ERRORS,
        tags=["audiences"],
        summary="List members, a page at a time",
    )
    def list_members(
        key: AudienceKey,
        caller: Reader,
        page_size: int = Query(50, ge=1, le=50),
        after: str | None = Query(None, description="The `page_info.after` of the previous page."),
        before: str | None = Query(None, description="The `page_info.before` of the next page."),
        tenant: Tenant | None = Query(
            None, description="Only members with this tenant; empty: only members without tenant."
        ),
    ):
        return caller.environment.list_members(key, page_size, after, before, tenant)

    @app.get(
        "/v1/audiences/{key}/members/{user_id}",
        response_model=Membership,
        responses=ERRORS,
        tags=["audiences"],
        summary="Check membership, tenant-strict (beyond Knock)",
    )
    async def check_member(
        key: AudienceKey,
        user_id: UserId,
        caller: Reader,
        tenant: Tenant | None = Query(
            None, description="The run's tenant; none or empty: no tenant."
        ),
    ):
        # Two indexed reads, answered on the event loop: cheaper than a hop to a worker thread.
        return JSONResponse(caller.environment.check(key, user_id, tenant_of(tenant)))

    @app.post(
        "/v1/audiences/{key}/broadcasts",
        status_code=202,
        response_model=BroadcastResult,
        responses=ERRORS,
        tags=["audiences"],
        summary="Trigger a workflow for every member (beyond Knock)",
    )
    async def broadcast(key: AudienceKey, body: BroadcastRequest, request: Request, caller: Writer):
        return await write(
            request,
            caller,
            202,
            lambda claim: caller.environment.broadcast(
                key, body.workflow, body.data, body.tenant, body.sink, body.broadcast_id, claim
            ),
        )

    # -- users -------------------------------------------------------------------------------------

    @app.put(
        "/v1/users/{user_id}",
        response_model=User,
        responses=ERRORS,
        tags=["users"],
        summary="Identify a user (merge properties; null removes one)",
        openapi_extra=PROPERTIES_BODY,
    )
    async def identify(user_id: UserId, request: Request, caller: Writer):
        properties = dict(await parsed_body(request, PROPERTIES_ADAPTER))
        if properties.get("id", user_id) != user_id:
            raise invalid("id", "differs from the user id in the path")
        properties.pop("id", None)
        return await write(
            request,
            caller,
            200,
            lambda claim: caller.environment.identify(user_id, properties, claim),
        )

    @app.get(
        "/v1/users/{user_id}",
        response_model=User,
        responses=ERRORS,
        tags=["users"],
        summary="Get a user",
    )
    def get_user(user_id: UserId, caller: Reader):
        return caller.environment.get_user(user_id)

    @app.delete(
        "/v1/users/{user_id}",
        status_code=204,
        responses=ERRORS,
        tags=["users"],
        summary="Delete a user; their memberships end, with exit events",
    )
    async def delete_user(user_id: UserId, request: Request, caller: Writer):
        return await write(
            request, caller, 204, lambda claim: caller.environment.delete_user(user_id, claim)
        )

    # -- guides ------------------------------------------------------------------------------------

    @app.get(
        "/v1/guides/{guide_key}/eligibility/{user_id}",
        response_model=GuideEligibility,
        responses=ERRORS,
        tags=["guides"],
        summary="Is the user eligible for a guide? (beyond Knock)",
    )
    def guide_eligibility(
        guide_key: GuideKey,
        user_id: UserId,
        caller: Reader,
        tenant: Tenant | None = Query(None, description="The request's tenant (strict mode)."),
    ):
        return caller.environment.guide_eligibility(guide_key, user_id, tenant_of(tenant))

    from audiences.api.census import census_router

    app.include_router(census_router(environments, authenticate, limiter, bearer))

    # -- plumbing ----------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError):
        fields = []
        for problem in error.errors():
            location = [
                str(part)
                for part in problem.get("loc", ())
                if part not in ("body", "query", "path", "header")
            ]
            if problem.get("type") == "json_invalid":
                in_query = tuple(problem.get("loc", ()))[:1] == ("query",)
                position = f" at character {location[0]}" if location and not in_query else ""
                fields.append(
                    {
                        "field": ".".join(location) if in_query else "body",
                        "type": "invalid_json",
                        "message": f"malformed JSON{position}: {problem.get('ctx', {}).get('error', '')}",
                    }
                )
            else:
                fields.append(
                    {
                        "field": ".".join(location) or "body",
                        "message": problem.get("msg", "invalid"),
                        "type": "invalid_params",
                    }
                )
        summary = "; ".join(f"{item['field']}: {item['message']}" for item in fields[:5])
        code = fields[0]["type"] if fields else "invalid_params"
        return JSONResponse(
            error_body(422, code, summary or "invalid request", fields), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException):
        code = {404: "resource_missing", 405: "method_not_allowed"}.get(
            error.status_code, "http_error"
        )
        return JSONResponse(
            error_body(error.status_code, code, str(error.detail)),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(500, "internal_error", "the server failed; the error is logged"),
            status_code=500,
        )

    app.router.add_event_handler("shutdown", lambda: close_app(app))
    app.openapi = lambda: openapi_with_members_body(app)
    app.add_middleware(RequestId)
    return app


# The members body is parsed by pydantic-core straight from the request's bytes (several times
# faster than `json.loads` and validating the result, on the API's busiest route); FastAPI then
# does not see it, so the OpenAPI document gets its schema here.
MEMBERS_ADAPTER = TypeAdapter(AudienceMembersRequest)
MEMBERS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/AudienceMembersRequest"}}
        },
    }
}
# Identify's body too: pydantic-core's parser refuses nesting too deep for the stack (where
# `json.loads` raises RecursionError).
PROPERTIES_ADAPTER = TypeAdapter(UserProperties)
PROPERTIES_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/UserProperties"}}
        },
    }
}


# Census's HTTP-request destination removes records with `DELETE ...?members=[...]` and no body
# (Knock's recipe), so removal also reads the members from the query.
REMOVE_MEMBERS = {
    "requestBody": {**MEMBERS_BODY["requestBody"], "required": False},
    "parameters": [
        {
            "name": "members",
            "in": "query",
            "required": False,
            "description": "The members as a JSON array, instead of a body (Census's HTTP destination).",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "array",
                        "maxItems": 1000,
                        "items": {"$ref": "#/components/schemas/AudienceMemberRequest"},
                    }
                }
            },
        }
    ],
}


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
    return await parsed_body(request, MEMBERS_ADAPTER)


async def parsed_body(request: Request, adapter: TypeAdapter) -> Any:
    """The request's JSON body, parsed and validated by pydantic-core in one step."""
    try:
        return adapter.validate_json(await request.body())
    except ValidationError as error:
        raise RequestValidationError(
            [
                {**problem, "loc": ("body", *problem["loc"])}
                for problem in error.errors(include_url=False)
            ]
        ) from None


def openapi_with_members_body(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for name, adapter in (
            ("AudienceMembersRequest", MEMBERS_ADAPTER),
            ("UserProperties", PROPERTIES_ADAPTER),
        ):
            schema = adapter.json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[name] = schema
        app.openapi_schema = document
    return app.openapi_schema


class RequestId:
    """ASGI middleware: every answer carries an `x-request-id` (idempotent replays name the first)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (b"x-request-id", request_id.encode()),
                    ],
                }
            await send(message)

        return await self.app(scope, receive, send_with_id)


def open_environments(settings: Settings) -> dict[str, Environment]:
    """Every environment the API serves, each with its own store: two environments given the same
    store would share keys and members, so that is refused."""
    urls: dict[str, str] = {}
    for name in settings.api_environments:
        url = settings.store_url_for(name)
        if url in urls.values():
            other = next(key for key, value in urls.items() if value == url)
            raise StoreEnvironmentError(
                f"the environments {other} and {name} have the same store "
                f"{safe_url(url)}; give each its own (AUDIENCES_STORE_URL_<ENV>)"
            )
        urls[name] = url
    opened: dict[str, Environment] = {}
    try:
        for name in urls:
            opened[name] = Environment.open(settings, name)
    except BaseException:
        for environment in opened.values():
            environment.close()
        raise
    return opened


def close_app(app: FastAPI) -> None:
    """Stop the writer threads and close the stores and the rate-limit file."""
    for environment in app.state.environments.values():
        environment.close()
    app.state.limiter.close()


def respond(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    if status == 204 or body is None:
        return Response(status_code=status, headers=headers)
    return JSONResponse(body, status_code=status, headers=headers)


def asgi_app(settings: Settings | None = None):
    """The service with its body limit, as uvicorn runs it."""
    import gc

    settings = settings or Settings.from_env()
    app = BodyLimit(create_app(settings), settings.api_max_body_bytes)
    # The objects alive now (modules, the app, its routes and schemas) live as long as the process:
    # moved out of the collector's reach, the full collections that the per-request garbage of a
    # 1,000-member batch sets off no longer walk them (they were the slowest answers' pauses).
    gc.freeze()
    return app
