"""The HTTP service: Knock's public API shapes for audiences and users, plus our extensions.

`audiences serve` runs it under uvicorn. `create_app` builds the app: one router per resource
(`routes/`, `census.py`), the shapes in `models.py`, authentication, rate limit and idempotent writes
in `dependencies.py`. Routes are thin: they validate the request (pydantic, which
also makes the OpenAPI document at `/openapi.json`), authenticate the key, apply the rate limit and
the idempotency key, and call `Environment` (service.py), which calls the same functions the
command-line tool does. Every error is Knock's shape (errors.py); bad input never gets a 500.
"""

import logging
import os
import uuid
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from audiences.api import census
from audiences.api.bulk import BulkWorker
from audiences.api.dependencies import bearer
from audiences.api.errors import ApiError, error_body, invalid
from audiences.api.identifiers import encoded_slash
from audiences.api.keys import StoreEnvironmentError, safe_url
from audiences.api.limits import BodyLimit, RateLimiter
from audiences.api.management import management_router
from audiences.api.models import (
    BODY_SCHEMAS,
    ERRORS,
    MEMBERS_ADAPTER,
    PROPERTIES_ADAPTER,
    ErrorBody,
)
from audiences.api.realtime import RealtimeWorker
from audiences.api.routes import (
    audiences,
    bulk,
    guides,
    tenants,
    user_list,
    user_merge,
    users,
)
from audiences.api.service import Environment
from audiences.api.workers import ADDRESS_VARIABLE, WorkerClient
from audiences.settings import Settings

log = logging.getLogger("audiences.api")


def create_app(settings: Settings | None = None, worker_address: str | None = None) -> FastAPI:
    """The app over every served environment. With `worker_address` (`audiences serve`: its
    worker process, `api/workers.py`), identifies are evaluated and deliveries sent in that
    process; without, real time runs in this one (tests, embedding)."""
    settings = settings or Settings.from_env()
    worker_address = worker_address or os.environ.get(ADDRESS_VARIABLE)
    environments = open_environments(settings)
    limiter = RateLimiter(
        {
            "read": settings.api_read_rate,
            "write": settings.api_write_rate,
            "delete": settings.api_delete_rate,
            "bulk": settings.api_bulk_rate,
        },
        settings.duckdb_path.parent / "api-rate-limits.bin",
    )
    app = FastAPI(
        title="Audiences engine API",
        version="1",
        description="Knock's public Audiences and Users API shapes (so Knock's SDKs and reverse-ETL tools "
        "work against it), plus membership checks, guide eligibility and broadcasts.",
    )
    app.state.environments = environments
    app.state.limiter = limiter
    for environment in environments.values():
        # Uploads answered just before a previous process died: their identify patches now.
        try:
            environment.apply_uploads()
        except Exception:
            log.exception("%s: could not apply the queued uploads' patches", environment.name)
        environment.bulk_worker = BulkWorker(environment).start()
        if worker_address is not None:
            environment.worker = WorkerClient(worker_address, environment)
            if settings.realtime:
                environment.realtime = environment.worker
        elif settings.realtime:
            environment.realtime = RealtimeWorker(environment).start()
        # Identifies journaled just before a previous process died: applied, then evaluated.
        try:
            environment.apply_journal()
        except Exception:
            log.exception("%s: could not apply the identify journal", environment.name)

    # The bulk and list routes before users' `/v1/users/{user_id}`: FastAPI matches in order.
    for routes in (audiences, bulk, user_list, user_merge, users, tenants, guides, census):
        app.include_router(routes.router)
    # Knock's management API (its CLI), built with the settings: environments and their files.
    app.include_router(management_router(settings, bearer))

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
                reason = problem.get("ctx", {}).get("error", "")
                fields.append(
                    {
                        "field": ".".join(location) if in_query else "body",
                        "type": "invalid_json",
                        "message": reason
                        if problem.get("msg") == "no body"
                        else f"malformed JSON{position}: {reason}",
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
    async def http_error(request: Request, error: StarletteHTTPException):
        headers = dict(getattr(error, "headers", None) or {})
        if error.status_code == 404:
            # A percent-encoded '/' in an id splits the path, so no route matches: name the id.
            slashed = encoded_slash(
                request.scope.get("raw_path") or b"",
                [route.path_regex for route in plain_routes(app.router.routes)],
            )
            if slashed is not None:
                name, value = slashed
                refused = invalid(
                    name, f"{value!r} contains '/': Knock's ids cannot contain '/' or '#'"
                )
                return JSONResponse(refused.body(), status_code=refused.status)
        if error.status_code == 405:
            # Every method of every route on this path (Starlette names only the first route's).
            headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
            if request.method == "OPTIONS":
                return Response(status_code=204, headers=headers)
        code = {404: "resource_missing", 405: "method_not_allowed"}.get(
            error.status_code, "http_error"
        )
        return JSONResponse(
            error_body(error.status_code, code, str(error.detail)),
            status_code=error.status_code,
            headers=headers or None,
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
            *BODY_SCHEMAS.items(),
        ):
            schema = adapter.json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[name] = schema
        document_every_error(document)
        app.openapi_schema = document
    return app.openapi_schema


def document_every_error(document: dict) -> None:
    """Every operation can answer 400 (a request uvicorn could not read), 401, 404, 413, 422 and
    429, each with Knock's error body, whichever router it comes from: say so in the document."""
    schemas = document["components"]["schemas"]
    error_schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas.setdefault("ErrorBody", error_schema)
    reference = {"$ref": "#/components/schemas/ErrorBody"}
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, answer in ERRORS.items():
                responses.setdefault(
                    str(status),
                    {
                        "description": answer["description"],
                        "content": {"application/json": {"schema": reference}},
                    },
                )


def allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """The methods some route answers on this scope's path, and OPTIONS."""
    methods = {"OPTIONS"}
    for route in plain_routes(app.router.routes):
        if getattr(route, "methods", None) and route.matches(scope)[0] != Match.NONE:
            methods |= set(route.methods) - {"HEAD"}
    return sorted(methods)


def plain_routes(routes: list) -> Iterator:
    """The routes with a path of their own, inside the included routers too (FastAPI keeps an
    included router as one entry; ours have no prefix, so their routes' paths are the app's)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from plain_routes(included.routes)
        elif hasattr(route, "path_regex"):
            yield route


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


def asgi_app(settings: Settings | None = None, worker_address: str | None = None):
    """The service with its body limit, as uvicorn runs it (`worker_address`: `create_app`'s)."""
    import gc

    settings = settings or Settings.from_env()
    app = BodyLimit(create_app(settings, worker_address), settings.api_max_body_bytes)
    # The objects alive now (modules, the app, its routes and schemas) live as long as the process:
    # moved out of the collector's reach, the full collections that the per-request garbage of a
    # 1,000-member batch sets off no longer walk them (they were the slowest answers' pauses).
    gc.freeze()
    return app
