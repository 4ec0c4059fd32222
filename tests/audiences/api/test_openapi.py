"""Schemathesis against the OpenAPI document the running service serves: for generated requests,
valid and invalid, no 500s, and every response matches the document (status, headers, body)."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis


@pytest.fixture(autouse=True)
def generous_rate_limits(monkeypatch):
    # Generated requests come fast; rate limiting has its own tests.
    monkeypatch.setenv("AUDIENCES_API_WRITE_RATE", "100000")
    monkeypatch.setenv("AUDIENCES_API_READ_RATE", "100000")


@pytest.fixture
def served_schema(service):
    import httpx

    # A few known members, so that generated requests also reach existing data.
    httpx.post(
        f"{service.url}/v1/audiences/newsletter/members",
        headers=service.headers(),
        json={
            "members": [
                {"user": {"id": "ada", "plan": "free"}},
                {"user": {"id": "bob"}, "tenant": "acme"},
            ]
        },
    )
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json")


def excluded(operation) -> list:
    """ "Schema-valid data is accepted" cannot hold on a few operations, for reasons no schema can
    describe: listing members, users and tenants takes opaque cursors (a string the service did
    not hand out is refused with a 422, as is `after` with `before`), and removing members needs
    them in the body or in the query, one of the two (OpenAPI has no way to say so), and an upload's
    body is a CSV file whose header must name an id column. Every other check still runs on these,
    and every check on the other operations."""
    from schemathesis.checks import positive_data_acceptance

    exempt = (
        (
            operation.path == "/v1/audiences/{key}/members"
            and operation.method.upper() in ("GET", "DELETE")
        )
        or (operation.path in ("/v1/users", "/v1/tenants") and operation.method.upper() == "GET")
        or operation.path == "/v1/audiences/{key}/members/upload"
    )
    return [positive_data_acceptance] if exempt else []


def configured_sinks_only(case) -> None:
    """A broadcast's `sink` names one of sinks.yml, which the service reads per request: any other
    name is refused with a 422 that no schema can describe. Generated broadcasts use the default
    sink; every other field is still generated, and every check runs."""
    if (
        case.operation.path.endswith("/broadcasts")
        and isinstance(case.body, dict)
        and case.body.get("sink")
    ):
        case.body["sink"] = None


def test_the_served_openapi_matches_what_the_service_does(served_schema, service):
    # Each operation in turn, through hypothesis (schemathesis's pytest plugin does not run on
    # pytest 9 yet, so the operations are driven directly).
    operations = [result.ok() for result in served_schema.get_all_operations()]
    assert len(operations) >= 10
    failures = []

    def exercise(operation):
        """Hypothesis' cases of one operation, each called and validated against the schema."""

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def call(case):
            configured_sinks_only(case)
            case.call_and_validate(headers=service.headers(), excluded_checks=excluded(operation))

        call()

    for operation in operations:
        try:
            exercise(operation)
        except Exception as failure:  # collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}:\n{failure}")
    assert not failures, "\n\n".join(failures)
