"""Census's custom-destination protocol (JSON-RPC 2.0) for static audiences.

Point a Census custom destination at `POST /v1/integrations/census/custom-destination` with a
secret key. Objects are the environment's static audiences; a record is a member: `user_id`
(required, the sync key), and optional `tenant`. Behaviours:

- `insert` / `upsert` (Census's "create only"): add the batch's members;
- `mirror`: Census sends the new and present rows as `upsert` batches (added) and the rows gone
  from the source as separate `delete` batches (removed), so the audience mirrors the source.

Per-record results follow the protocol: one `{identifier, success, error_message}` per record, so a
bad row is reported and the rest of the batch goes in.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from audiences.api.dependencies import authenticate, bearer, check_rate, parsed_body
from audiences.api.errors import ApiError
from audiences.api.service import Environment
from audiences.identifiers import id_problem, tenant_problem
from audiences.store.database import normalize_tenant
from audiences.store.members import MAX_MEMBERS_PER_CALL

OPERATIONS = ["insert", "upsert", "mirror"]
RPC_ADAPTER = TypeAdapter(dict[str, Any])
FIELDS = [
    {
        "field_api_name": "user_id",
        "label": "User ID",
        "identifier": True,
        "required": True,
        "createable": True,
        "updateable": False,
        "type": "string",
        "array": False,
    },
    {
        "field_api_name": "tenant",
        "label": "Tenant",
        "identifier": False,
        "required": False,
        "createable": True,
        "updateable": False,
        "type": "string",
        "array": False,
    },
]


class RpcError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


router = APIRouter(tags=["integrations"])


@router.post(
    "/v1/integrations/census/custom-destination",
    summary="Census custom destination (JSON-RPC 2.0): audiences as objects, members as records",
    response_model=dict[str, Any],
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "A JSON-RPC 2.0 request",
            "content": {
                "application/json": {"schema": {"type": "object", "additionalProperties": True}}
            },
        }
    },
)
async def census(
    http: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
):
    # The key first, then the body: a caller without a key learns nothing of the body's checks.
    caller = authenticate(http, credentials)
    check_rate(http, caller, "write")
    request = await parsed_body(http, RPC_ADAPTER)
    request_id = request.get("id")
    try:
        if request.get("jsonrpc") != "2.0" or not isinstance(request.get("method"), str):
            raise RpcError(-32600, "not a JSON-RPC 2.0 request")
        params = request.get("params") or {}
        if not isinstance(params, dict):
            raise RpcError(-32602, "params must be an object")
        result = await run_in_threadpool(dispatch, caller.environment, request["method"], params)
    except RpcError as error:
        return {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {"code": error.code, "message": error.message},
        }
    except ApiError as error:
        return {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {"code": -32000, "message": error.message},
        }
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def dispatch(environment: Environment, method: str, params: dict) -> dict:
    if method == "test_connection":
        return {"success": True}
    if method == "list_objects":
        return {
            "objects": [
                {"object_api_name": key, "label": key}
                for key, kind in sorted(environment.audience_types().items())
                if kind == "static"
            ]
        }
    if method == "list_fields":
        _audience(environment, params.get("object"))
        return {"fields": FIELDS}
    if method == "supported_operations":
        _audience(environment, params.get("object"))
        return {"operations": OPERATIONS}
    if method == "get_sync_speed":
        return {
            "maximum_batch_size": MAX_MEMBERS_PER_CALL,
            "maximum_parallel_batches": 4,
            "maximum_records_per_second": 20000,
        }
    if method == "sync_batch":
        return sync_batch(environment, params)
    raise RpcError(-32601, f"unknown method {method!r}")


def _audience(environment: Environment, described: object) -> str:
    key = described.get("object_api_name") if isinstance(described, dict) else None
    if not isinstance(key, str) or environment.audience_types().get(key) != "static":
        raise RpcError(-32602, f"unknown static audience {key!r}")
    return key


def sync_batch(environment: Environment, params: dict) -> dict:
    plan = params.get("sync_plan") or {}
    key = _audience(environment, plan.get("object"))
    operation = plan.get("operation")
    if operation not in (*OPERATIONS, "delete"):
        raise RpcError(
            -32602, f"unsupported operation {operation!r}; supported: {', '.join(OPERATIONS)}"
        )
    records = params.get("records")
    if not isinstance(records, list):
        raise RpcError(-32602, "records must be a list")
    results: list[dict] = []
    members: list[dict] = []
    for record in records:
        user_id = record.get("user_id") if isinstance(record, dict) else None
        if isinstance(user_id, int) and not isinstance(user_id, bool):
            user_id = str(user_id)  # Census allows integer identifiers
        tenant = record.get("tenant") if isinstance(record, dict) else None
        identifier = user_id if isinstance(user_id, str) else repr(user_id)
        problem = _problem(user_id, tenant)
        if problem:
            results.append({"identifier": identifier, "success": False, "error_message": problem})
            continue
        members.append({"user": {"id": user_id}, "tenant": normalize_tenant(tenant)})
        results.append({"identifier": user_id, "success": True, "error_message": None})
    action = "remove" if operation == "delete" else "add"
    for start in range(0, len(members), MAX_MEMBERS_PER_CALL):
        environment.change_members(
            key, members[start : start + MAX_MEMBERS_PER_CALL], action, source="census"
        )
    return {"record_results": results}


def _problem(user_id: object, tenant: object) -> str | None:
    if not isinstance(user_id, str) or not user_id.strip():
        return "user_id is missing or blank"
    problem = id_problem(user_id)
    if problem:
        return f"user_id: {problem}"
    if tenant is not None and not isinstance(tenant, str):
        return "tenant must be text"
    problem = tenant_problem(tenant)
    if problem:
        return f"tenant: {problem}"
    for text in (user_id, tenant or ""):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid Unicode"
        if "\x00" in text:
            return "contains a NUL character"
    return None
