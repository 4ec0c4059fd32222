"""Knock's management API for audiences and commits, so Knock's own CLI (`knock`) works against us.

`knock --api-origin http://127.0.0.1:8800 audience pull|push|validate|list|get|archive`,
`knock commit`, `knock commit list`, `knock commit promote` and `knock whoami` call these routes
(paths, parameters and answers as `@knocklabs/cli` 1.1.2 sends and reads them; see
`docs/api.md`). They authenticate with a service token (`audiences keys create --service-token`),
which, like Knock's, is one for every environment: the environment travels as a query parameter.
A push without an environment lands in the first environment (the CLI sends none), as a working
file in the Knock CLI layout; committing, promoting and archiving call the same functions as the
`audiences` commands (`audiences/lifecycle/`).
"""

import json
import os
import secrets
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials

from audiences.api.errors import ApiError, ErrorBody, not_found
from audiences.api.keys import key_hash
from audiences.conditions.definitions import (
    DEFINITION_FILE,
    KEY_PATTERN,
    DefinitionError,
    knock_incompatibilities,
    parse_definition,
    validate_definitions,
)
from audiences.lifecycle import commits as lifecycle
from audiences.settings import Settings
from audiences.store import database as tables
from audiences.store.database import MembershipStore, now_text

# Service tokens are stored in the first environment's store, with this in place of an
# environment: they are valid in every environment.
SERVICE_TOKEN_SCOPE = "*"
SERVICE_TOKEN_PREFIX = "knock_st_"
# `knock_extensions`: the conditions Knock's own audiences cannot hold (event conditions), so that a
# `knock audience pull` shows in the file's `__readonly` why this audience cannot go to Knock.
READONLY_FIELDS = ["environment", "key", "created_at", "updated_at", "sha", "knock_extensions"]
ERRORS = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        401: "No service token, or one that does not exist or was revoked.",
        404: "No such audience or commit.",
        422: "Bad input, or a refused definition, commit or promotion: `message` names the "
        "audience and field, the commit or the environment.",
    }.items()
}
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100


def create_service_token(store: MembershipStore, name: str) -> tuple[str, str]:
    """A service token for the management API: returns its id and its secret (shown once)."""
    secret = f"{SERVICE_TOKEN_PREFIX}{secrets.token_urlsafe(32)}"
    key_id = secrets.token_hex(8)
    with store.engine.begin() as connection:
        connection.execute(
            tables.api_keys.insert().values(
                key_id=key_id,
                key_hash=key_hash(secret),
                name=name,
                environment=SERVICE_TOKEN_SCOPE,
                created_at=now_text(),
                revoked_at=None,
            )
        )
    return key_id, secret


def find_service_token(store: MembershipStore, secret: str) -> str | None:
    """The name of the live service token with this secret, if any."""
    keys = tables.api_keys
    with store.read_engine.connect() as connection:
        return connection.execute(
            sa.select(keys.c.name).where(
                keys.c.key_hash == key_hash(secret),
                keys.c.environment == SERVICE_TOKEN_SCOPE,
                keys.c.revoked_at.is_(None),
            )
        ).scalar()


# -- shapes -------------------------------------------------------------------------------------


def _iso(text: str | None) -> str:
    """Our stored times as Knock writes them (ISO 8601, `Z`)."""
    return text or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _file_time(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def audience_body(
    key: str, definition: dict, environment: str, created_at: str, updated_at: str, annotate: bool
) -> dict:
    body = {
        "key": key,
        "name": definition.get("name"),
        "type": definition.get("type"),
        "description": definition.get("description"),
        **(
            {"segments": definition.get("segments") or []}
            if definition.get("type") == "dynamic"
            else {}
        ),
        # Our field: Knock's CLI writes every field it is given, so a pull keeps it.
        **({"tenancy": definition["tenancy"]} if "tenancy" in definition else {}),
        "environment": environment,
        "created_at": _iso(created_at),
        "updated_at": _iso(updated_at),
        "sha": lifecycle.content_hash(definition),
    }
    extensions = knock_extensions(key, definition)
    if extensions:
        body["knock_extensions"] = extensions
    if annotate:
        body["__annotation"] = {"extractable_fields": {}, "readonly_fields": READONLY_FIELDS}
    return body


def knock_extensions(key: str, definition: dict) -> list[str]:
    """Each condition of a definition that is valid here but that Knock cannot hold, as
    `<json path>: <why>` (`validate --knock-compatible`'s problems); none for a definition that does
    not parse (its errors are reported where it is validated)."""
    try:
        parsed = parse_definition(definition, key, Path(key) / DEFINITION_FILE)
    except DefinitionError:
        return []
    return [
        f"{problem.json_path}: {problem.message}" for problem in knock_incompatibilities(parsed)
    ]


def commit_body(commit: lifecycle.Commit, environment: str) -> dict:
    return {
        "id": commit.commit_id,
        "environment": environment,
        "resource": {"type": "audience", "identifier": commit.audience_key},
        "author": {"email": commit.author, "name": commit.author},
        "commit_message": commit.message,
        "created_at": _iso(commit.created_at),
    }


def page(entries: list[dict], limit: int | None, after: str | None, cursor: Callable) -> dict:
    """One page of `entries`, with Knock's `page_info` (the cursor is the last entry's)."""
    size = min(limit or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if after:
        for index, entry in enumerate(entries):
            if cursor(entry) == after:
                entries = entries[index + 1 :]
                break
        else:
            raise ApiError(422, "invalid_params", f"after: unknown cursor {after!r}", field="after")
    shown = entries[:size]
    return {
        "entries": shown,
        "page_info": {
            "after": cursor(shown[-1]) if len(entries) > size else None,
            "before": None,
            "page_size": size,
        },
    }


# -- promoting ----------------------------------------------------------------------------------


def promote_in_process_of_its_own(
    settings: Settings, to: str, commit_id: str | None, *, evaluate: bool
) -> tuple[str, str]:
    """Promote as `audiences promote` does, the one way: a run of the `promote_definitions` job
    (`run_promotion`: impact measured, commits copied, the target evaluated at once in a run of
    its main job, all in the Dagster instance's history), in a process of its own so that the
    evaluation never holds the API's interpreter. Waits for it. Returns ("promoted", log path),
    ("refused", why: nothing was written) or ("failed", why); the run's output goes to
    `promotion-runs.log` beside the target's warehouse."""
    import multiprocessing

    log = settings.for_environment(to).duckdb_path.parent / "promotion-runs.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    receiving, sending = context.Pipe(duplex=False)
    process = context.Process(
        target=_promotion_process,
        args=(settings, to, commit_id, evaluate, str(log), sending),
        name="audiences-promotion",
    )
    process.start()
    sending.close()
    try:
        answer = receiving.recv()
    except EOFError:
        answer = ("failed", f"the promotion's process ended without an answer; see {log}")
    finally:
        receiving.close()
        process.join()
    return answer


def _promotion_process(settings, to, commit_id, evaluate, log, answers) -> None:
    """The promotion's process: `run_promotion`, its output in `log`, its outcome sent back."""
    import argparse

    with open(log, "ab") as output:
        os.dup2(output.fileno(), 1)
        os.dup2(output.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    try:
        from audiences.lifecycle.commands import PromotionReport
        from pipelines.defs.lifecycle import run_promotion

        report = PromotionReport(arguments=argparse.Namespace(debug=False, verbose=False))
        result = run_promotion(
            settings,
            to,
            commit_id,
            evaluate=evaluate,
            report=report,
            launched_by="knock commit promote",
        )
        if report.error is not None:
            answers.send(("refused", str(report.error)))
        elif report.outcome is None or report.outcome.status not in (None, 0):
            errors = [
                event.step_failure_data.error.message.strip()
                for event in result.get_step_failure_events()
                if event.step_failure_data.error is not None
            ]
            answers.send(
                (
                    "failed",
                    "; ".join(errors) or f"run {result.run_id} of promote_definitions failed",
                )
            )
        else:
            answers.send(("promoted", log))
    except BaseException as error:  # sent back, so the request is answered whatever happened
        answers.send(("failed", f"{type(error).__name__}: {error}; see {log}"))
    finally:
        answers.close()


# -- the router ---------------------------------------------------------------------------------


def management_router(settings: Settings, bearer) -> APIRouter:
    """The management routes, authenticated with a service token."""
    router = APIRouter(tags=["management (Knock CLI)"], responses=ERRORS)
    first = settings.development_environment
    token_store = lifecycle.open_store(settings, first)

    async def service_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> str:
        secret = credentials.credentials if credentials else ""
        name = await run_in_threadpool(find_service_token, token_store, secret) if secret else None
        if name is None:
            raise ApiError(
                401,
                "unauthenticated",
                "send a service token (`audiences keys create --service-token`) as "
                "`Authorization: Bearer <token>`; an environment's secret key does not manage definitions",
            )
        return name

    Token = Annotated[str, Depends(service_token)]

    def environment_of(name: str | None) -> str:
        name = name or first
        if name not in settings.environments:
            raise ApiError(
                422,
                "invalid_params",
                f"environment: unknown environment {name!r}; the environments are "
                f"{', '.join(settings.environments)}",
                field="environment",
            )
        return name

    def refuse(error: Exception) -> ApiError:
        if isinstance(error, DefinitionError):
            first_problem = error.problems[0]
            return ApiError(
                422,
                "invalid_params",
                "; ".join(
                    f"{Path(problem.file).parent.name}: {problem.json_path}: {problem.message}"
                    for problem in error.problems
                ),
                field=first_problem.json_path,
            )
        return ApiError(422, "invalid_params", str(error))

    # -- audiences ------------------------------------------------------------------------------

    def audiences_in(environment: str, hide_uncommitted: bool, annotate: bool) -> list[dict]:
        store = lifecycle.open_store(settings, environment)
        try:
            history = lifecycle.commits_in(store)
        finally:
            store.dispose()
        created = {}
        for commit in history:
            created.setdefault(commit.audience_key, commit.created_at)
        latest = {commit.audience_key: commit for commit in history}
        if environment == first and not hide_uncommitted:
            documents, _ = lifecycle.working_documents(settings.working_definitions_dir)
            folder = settings.working_definitions_dir
            return [
                audience_body(
                    key,
                    document,
                    environment,
                    created.get(key) or _file_time(folder / key / DEFINITION_FILE),
                    _file_time(folder / key / DEFINITION_FILE),
                    annotate,
                )
                for key, document in sorted(documents.items())
            ]
        return [
            audience_body(
                key,
                commit.definition,
                environment,
                created[key],
                commit.promoted_at or commit.created_at,
                annotate,
            )
            for key, commit in sorted(latest.items())
            if commit.action == "commit"
        ]

    @router.get("/v1/audiences", summary="List audiences (Knock management API)")
    def list_audiences(
        _token: Token,
        environment: str | None = None,
        hide_uncommitted_changes: bool = False,
        annotate: bool = False,
        limit: Annotated[int | None, Query(ge=1, le=MAX_PAGE_SIZE)] = None,
        after: str | None = None,
        branch: str | None = None,
    ):
        name = environment_of(environment)
        entries = audiences_in(name, hide_uncommitted_changes, annotate)
        return page(entries, limit, after, lambda entry: entry["key"])

    @router.get("/v1/audiences/{key}", summary="Get an audience (Knock management API)")
    def get_audience(
        key: str,
        _token: Token,
        environment: str | None = None,
        hide_uncommitted_changes: bool = False,
        annotate: bool = False,
        branch: str | None = None,
    ):
        name = environment_of(environment)
        for entry in audiences_in(name, hide_uncommitted_changes, annotate):
            if entry["key"] == key:
                return entry
        raise not_found(f"audience {key!r} in {name}")

    def check(key: str, body: dict, environment: str) -> dict:
        """The audience document a push or validate sends, cleaned and checked as `validate`
        checks it: refused with a message naming the audience and the JSON path."""
        if not KEY_PATTERN.fullmatch(key):
            raise ApiError(
                422,
                "invalid_params",
                f"key: bad audience key {key!r}: use a-z, 0-9, '-' and '_'",
                field="key",
            )
        document = body.get("audience") if isinstance(body, dict) else None
        if not isinstance(document, dict):
            raise ApiError(
                422,
                "invalid_params",
                f'audience {key!r}: the body must be {{"audience": {{...}}}}',
                field="audience",
            )
        document = lifecycle.clean_definition(document)
        folder = settings.working_definitions_dir
        path = folder / key / DEFINITION_FILE
        try:
            definition = parse_definition(document, key, path)
        except DefinitionError as error:
            raise refuse(error) from None
        documents, _ = lifecycle.working_documents(folder)
        documents[key] = document
        others = {}
        for other, other_document in documents.items():
            try:
                others[other] = parse_definition(
                    other_document, other, folder / other / DEFINITION_FILE
                )
            except DefinitionError:
                continue
        others[key] = definition
        existing = {}
        for name in settings.environments:
            store = lifecycle.open_store(settings, name)
            try:
                for other, live in lifecycle.live_definitions(store).items():
                    existing.setdefault(other, live.get("type"))
            finally:
                store.dispose()
        from audiences.dbt.models import custom_audience_keys

        problems = [
            problem
            for problem in validate_definitions(
                others, custom_audience_keys(settings.dbt_project_dir_for(first)), existing
            )
            if problem.file == str(path)
        ]
        if problems:
            raise refuse(DefinitionError(problems))
        return document

    async def json_body(request: Request) -> dict:
        raw = await request.body()
        try:
            return json.loads(raw or b"{}")
        except ValueError as error:
            raise ApiError(
                422, "invalid_json", f"body: malformed JSON: {error}", field="body"
            ) from None

    @router.put(
        "/v1/audiences/{key}/validate", summary="Validate an audience (Knock management API)"
    )
    async def validate_audience(
        key: str,
        request: Request,
        _token: Token,
        environment: str | None = None,
        branch: str | None = None,
    ):
        name = environment_of(environment)
        document = await run_in_threadpool(check, key, await json_body(request), name)
        return {"audience": audience_body(key, document, name, now_text(), now_text(), True)}

    @router.put(
        "/v1/audiences/{key}", summary="Create or update an audience (Knock management API)"
    )
    async def upsert_audience(
        key: str,
        request: Request,
        token: Token,
        environment: str | None = None,
        force: bool = False,
        commit: bool = False,
        commit_message: str | None = None,
        branch: str | None = None,
    ):
        name = environment_of(environment)
        body = await json_body(request)

        def work() -> dict:
            if name != first and not force:
                raise ApiError(
                    422,
                    "invalid_params",
                    f"audience {key!r}: {name} receives definitions by promotion: push to {first}, "
                    f"`knock commit`, then `knock commit promote --to {name}`; force=true edits it directly",
                    field="environment",
                )
            document = check(key, body, name)
            lifecycle.write_definition(settings.working_definitions_dir, key, document)
            if commit or name != first:
                try:
                    lifecycle.commit_changes(
                        settings,
                        commit_message or f"pushed {key}",
                        environment=name,
                        author=token,
                        force=force,
                        keys={key},
                    )
                except lifecycle.LifecycleError as error:
                    if "nothing to commit" not in str(error):
                        raise refuse(error) from None
            path = settings.working_definitions_dir / key / DEFINITION_FILE
            return {
                "audience": audience_body(
                    key, document, name, _file_time(path), _file_time(path), True
                )
            }

        return await run_in_threadpool(work)

    @router.delete("/v1/audiences/{key}", summary="Archive an audience in every environment")
    async def archive_audience(
        key: str, token: Token, environment: str | None = None, branch: str | None = None
    ):
        environment_of(environment)

        def work():
            try:
                lifecycle.archive(settings, key, author=token)
            except lifecycle.LifecycleError as error:
                if "unknown audience" in str(error):
                    raise not_found(f"audience {key!r}") from None
                raise refuse(error) from None
            return {"result": "success"}

        return await run_in_threadpool(work)

    # -- commits --------------------------------------------------------------------------------

    def furthest(commit_id: str) -> tuple[lifecycle.Commit, str] | None:
        found = None
        for name in settings.environments:
            store = lifecycle.open_store(settings, name)
            try:
                for commit in lifecycle.commits_in(store):
                    if commit.commit_id == commit_id:
                        found = (commit, name)
            finally:
                store.dispose()
        return found

    @router.put("/v1/commits", summary="Commit every change in the first environment")
    async def commit_all(
        token: Token,
        environment: str | None = None,
        commit_message: str | None = None,
        resource_type: str | None = None,
        resource_id: str | None = None,
        branch: str | None = None,
    ):
        name = environment_of(environment)

        def work():
            try:
                lifecycle.commit_changes(
                    settings,
                    commit_message or "committed with the Knock CLI",
                    environment=name,
                    author=token,
                    keys={resource_id} if resource_type == "audience" and resource_id else None,
                )
            except (lifecycle.LifecycleError, DefinitionError) as error:
                raise refuse(error) from None
            return {"result": "success"}

        return await run_in_threadpool(work)

    @router.get("/v1/commits", summary="List commits")
    def list_commits(
        _token: Token,
        environment: str | None = None,
        promoted: bool | None = None,
        resource_type: str | None = None,
        resource_id: str | None = None,
        limit: Annotated[int | None, Query(ge=1, le=MAX_PAGE_SIZE)] = None,
        after: str | None = None,
        branch: str | None = None,
    ):
        name = environment_of(environment)
        place = settings.environments.index(name)
        store = lifecycle.open_store(settings, name)
        try:
            found = lifecycle.commits_in(
                store, resource_id if resource_type in (None, "audience") else ""
            )
        finally:
            store.dispose()
        if promoted is not None and place + 1 < len(settings.environments):
            following = lifecycle.open_store(settings, settings.environments[place + 1])
            try:
                moved = {commit.commit_id for commit in lifecycle.commits_in(following)}
            finally:
                following.dispose()
            found = [commit for commit in found if (commit.commit_id in moved) == promoted]
        entries = [commit_body(commit, name) for commit in reversed(found)]
        return page(entries, limit, after, lambda entry: entry["id"])

    @router.get("/v1/commits/{commit_id}", summary="Get a commit")
    def get_commit(commit_id: str, _token: Token):
        found = furthest(commit_id)
        if found is None:
            raise not_found(f"commit {commit_id!r}")
        return commit_body(*found)

    def promoted(to: str, commit_id: str | None):
        try:
            # Refusals (an unknown environment or commit, nothing to promote) answered at once.
            plan = lifecycle.plan_promotion(settings, to, commit_id)
            if not plan.commits:
                raise lifecycle.LifecycleError(
                    f"nothing to promote: {to} has every commit of {plan.source}"
                )
            source = lifecycle.open_store(settings, plan.source)
            try:
                with source.read_engine.connect() as connection:
                    lifecycle.refuse_during_promotion(connection, plan.source)
            finally:
                source.dispose()
        except lifecycle.LifecycleError as error:
            raise refuse(error) from None
        outcome, detail = promote_in_process_of_its_own(
            settings, to, commit_id, evaluate=settings.promotion_evaluates
        )
        if outcome == "refused":
            raise refuse(lifecycle.LifecycleError(detail))
        if outcome != "promoted":
            raise ApiError(500, "promotion_failed", detail)

    @router.put("/v1/commits/promote", summary="Promote every commit to an environment")
    async def promote_all(_token: Token, to_environment: str | None = None):
        if not to_environment:
            raise ApiError(
                422, "invalid_params", "to_environment: required", field="to_environment"
            )
        if to_environment not in settings.environments:
            environment_of(to_environment)
        await run_in_threadpool(promoted, to_environment, None)
        return {"result": "success"}

    @router.put(
        "/v1/commits/{commit_id}/promote", summary="Promote one commit to the next environment"
    )
    async def promote_one(commit_id: str, _token: Token):
        found = await run_in_threadpool(furthest, commit_id)
        if found is None:
            raise not_found(f"commit {commit_id!r}")
        commit, where = found
        place = settings.environments.index(where)
        if place + 1 >= len(settings.environments):
            raise ApiError(
                422,
                "invalid_params",
                f"commit {commit_id!r} is already in {where}, the last environment",
            )
        target = settings.environments[place + 1]
        await run_in_threadpool(promoted, target, commit_id)
        return {"commit": commit_body(commit, target)}

    # -- account --------------------------------------------------------------------------------

    @router.get("/v1/whoami", summary="The service token's account")
    def whoami(token: Token):
        return {
            "account_name": "Audiences engine",
            "account_slug": "audiences",
            "type": "service_token",
            "service_token_name": token,
            "account_features": {},
        }

    @router.get("/v1/environments", summary="The environments, in promotion order")
    def environments(_token: Token, after: str | None = None):
        entries = [
            {
                "slug": name,
                "name": name.capitalize(),
                "order": place,
                "owner": "system",
                "created_at": _iso(None),
                "updated_at": _iso(None),
            }
            for place, name in enumerate(settings.environments)
        ]
        return page(entries, None, after, lambda entry: entry["slug"])

    return router
