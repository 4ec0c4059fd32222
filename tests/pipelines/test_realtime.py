"""Real time (issue 19): an identify through the API evaluates that user's dynamic audiences at once,
records their events with the pipeline's ids and queues their triggers; the next pipeline run
agrees and repeats none of them; a disagreement is corrected by the batch and counted."""

from __future__ import annotations

import contextlib
import json
import time
from datetime import UTC, datetime

import dagster as dg
import duckdb
import httpx
import pytest
import sqlalchemy as sa
from api_server import running_server
from condition_harness import copy_sample_run

from audiences.api.app import close_app
from audiences.store import database as tables
from audiences.store.database import MembershipStore
from audiences.workflows.realtime import event_id
from pipelines import build_definitions

ADA = {
    "plan": "enterprise",
    "tags": ["admin"],
    "email": "ada@example.com",
    "mrr": 5000,
    "feature_flags": ["dark_mode"],
}


@pytest.fixture
def project(sample_run, tmp_path, monkeypatch):
    """A copy of the sample run, its workflows plus a trigger on enterprise-admins, and the API."""
    copy_sample_run(sample_run, tmp_path)
    workflows = tmp_path / "workflows" / "welcome-admins"
    workflows.mkdir(parents=True)
    (workflows / "trigger.json").write_text(
        json.dumps({"audience": "enterprise-admins", "on": "entered"})
    )
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("AUDIENCES_SINKS", str(tmp_path / "sinks.yml"))
    monkeypatch.setenv("AUDIENCES_WORKFLOWS", str(tmp_path / "workflows"))
    monkeypatch.delenv("AUDIENCES_REALTIME", raising=False)
    return tmp_path


def start_api(folder):
    from audiences.api.app import asgi_app
    from audiences.api.keys import create_key
    from audiences.settings import Settings

    store = MembershipStore(f"sqlite:///{folder / 'store.sqlite'}").create()
    secret = create_key(store, "development", "tests")[1]
    store.dispose()
    return asgi_app(Settings.from_env()), {"Authorization": f"Bearer {secret}"}


def identify(url, headers, user_id, properties):
    response = httpx.put(f"{url}/v1/users/{user_id}", json=properties, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response


def wait_idle(app):
    for environment in app.app.state.environments.values():
        if environment.realtime is not None:
            assert environment.realtime.wait_idle(30)


def events_of(store, user_id) -> list[tuple]:
    columns = tables.membership_events.c
    return [
        (
            row["audience_key"],
            row["event_type"],
            row["entry_number"],
            row["event_id"],
            row["source"],
        )
        for row in store.rows(
            sa.select(
                columns.audience_key,
                columns.event_type,
                columns.entry_number,
                columns.event_id,
                columns.source,
            )
            .where(columns.user_id == user_id)
            .order_by(columns.audience_key, columns.entry_number, columns.event_type)
        )
    ]


def run_pipeline(instance, minute: int) -> dict:
    """One re-evaluation (the 15-minute schedule's job) at 2026-11-01T00:<minute>; the
    membership_changes metadata."""
    defs = build_definitions()
    tick = datetime.fromisoformat(f"2026-11-01T00:{minute:02d}:00+00:00")
    schedule = defs.resolve_schedule_def("reevaluate_every_15_minutes")
    [request] = schedule.evaluate_tick(
        dg.build_schedule_context(instance=instance, scheduled_execution_time=tick)
    ).run_requests
    result = defs.resolve_job_def(request.job_name or "reevaluate_audiences").execute_in_process(
        run_config=request.run_config, instance=instance, tags=request.tags
    )
    assert result.success
    event = instance.get_latest_materialization_event(dg.AssetKey("membership_changes"))
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


@pytest.mark.slow
def test_an_identify_moves_the_user_at_once_and_the_next_run_agrees_without_doubling(project):
    store = MembershipStore(f"sqlite:///{project / 'store.sqlite'}").create()
    app, headers = start_api(project)
    ada = "rt-ada"
    with dg.DagsterInstance.ephemeral() as instance, running_server(app) as url:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        identify(
            url,
            headers,
            ada,
            {**ADA, "onboarding": {"completed_steps": 5}, "seats": 12, "last_seen_at": now},
        )
        wait_idle(app)
        recorded = events_of(store, ada)
        # enterprise-admins, power-users, and beta-invite-candidates, which refers to power-users.
        assert {(key, kind, entry) for key, kind, entry, _, _ in recorded} == {
            ("enterprise-admins", "entered", 1),
            ("power-users", "entered", 1),
            ("beta-invite-candidates", "entered", 1),
        }
        for key, kind, entry, identifier, source in recorded:
            assert source == "realtime"
            assert identifier == event_id(key, ada, None, kind, entry)
        members = tables.audience_members.c
        assert {
            row["audience_key"]
            for row in store.rows(sa.select(members.audience_key).where(members.user_id == ada))
        } == {"enterprise-admins", "power-users", "beta-invite-candidates"}
        deliveries = tables.deliveries.c
        queued = store.rows(
            sa.select(deliveries.workflow_key, deliveries.status, deliveries.event_id).where(
                deliveries.user_id == ada
            )
        )
        assert [(row["workflow_key"], row["status"]) for row in queued] == [
            ("welcome-admins", "pending")
        ]

        # The next run loads the patch and agrees: no event is emitted again, no disagreement.
        metadata = run_pipeline(instance, 15)
        assert metadata["realtime_events_imported"] == 3
        assert metadata["realtime_disagreements"] == 0
        assert events_of(store, ada) == recorded
        with duckdb.connect(str(project / "warehouse.duckdb"), read_only=True) as warehouse:
            assert (
                warehouse.execute(
                    "select count(*) from raw.membership_outbox where user_id = $u", {"u": ada}
                ).fetchall()[0][0]
                == 0
            )

        # Out and back in before the next run: exited #1, entered #2, and the run agrees again.
        identify(url, headers, ada, {"plan": "pro"})
        wait_idle(app)
        identify(url, headers, ada, {"plan": "enterprise"})
        wait_idle(app)
        admins = [e for e in events_of(store, ada) if e[0] == "enterprise-admins"]
        assert [(kind, entry) for _, kind, entry, _, _ in admins] == [
            ("entered", 1),
            ("exited", 1),
            ("entered", 2),
        ]
        before = events_of(store, ada)
        metadata = run_pipeline(instance, 30)
        assert metadata["realtime_disagreements"] == 0
        assert events_of(store, ada) == before
        # And the history the pipeline keeps continues from real time's: the next exit is #2.
        identify(url, headers, ada, {"plan": "pro"})
        wait_idle(app)
        metadata = run_pipeline(instance, 45)
        assert metadata["realtime_disagreements"] == 0
        admins = [e[1:3] for e in events_of(store, ada) if e[0] == "enterprise-admins"]
        assert admins == [("entered", 1), ("exited", 1), ("entered", 2), ("exited", 2)]
    close_app(app.app)
    store.dispose()


@pytest.mark.slow
def test_the_batch_wins_a_disagreement_with_an_event_and_counts_it(project):
    """A real-time decision the batch does not share (here written by hand, as a bug would) is
    corrected by the run's own event and counted in its metadata as a defect."""
    store = MembershipStore(f"sqlite:///{project / 'store.sqlite'}").create()
    app, headers = start_api(project)
    with dg.DagsterInstance.ephemeral() as instance, running_server(app) as url:
        identify(url, headers, "rt-bob", {"plan": "free", "email": "bob@example.com"})
        wait_idle(app)
        assert events_of(store, "rt-bob") == []
        patches = tables.user_patches.c
        patch_id = store.scalar(
            sa.select(sa.func.max(patches.patch_id)).where(patches.user_id == "rt-bob")
        )
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        wrong = event_id("enterprise-admins", "rt-bob", None, "entered", 1)
        with store.engine.begin() as connection:
            connection.execute(
                tables.realtime_events.insert().values(
                    event_id=wrong,
                    audience_key="enterprise-admins",
                    user_id="rt-bob",
                    event_type="entered",
                    entry_number=1,
                    occurred_at=stamp,
                    patch_id=patch_id,
                )
            )
        metadata = run_pipeline(instance, 15)
        assert metadata["realtime_disagreements"] == 1
        with duckdb.connect(str(project / "warehouse.duckdb"), read_only=True) as warehouse:
            assert warehouse.execute(
                "select audience_key, event_type, entry_number from raw.membership_outbox "
                "where user_id = 'rt-bob'"
            ).fetchall() == [("enterprise-admins", "exited", 1)]
    close_app(app.app)
    store.dispose()


def test_an_invalid_identify_changes_nothing_and_names_the_field(project):
    store = MembershipStore(f"sqlite:///{project / 'store.sqlite'}").create()
    app, headers = start_api(project)
    with running_server(app) as url:
        response = httpx.put(
            f"{url}/v1/users/rt-carol",
            content='{"plan": "enterprise", "tags": ["admin"], "score": NaN}',
            headers={**headers, "Content-Type": "application/json"},
            timeout=10,
        )
        assert response.status_code == 422
        assert "score" in response.text
        wait_idle(app)
        assert events_of(store, "rt-carol") == []
        profiles = tables.user_profiles.c
        assert store.rows(sa.select(profiles.user_id).where(profiles.user_id == "rt-carol")) == []
    close_app(app.app)
    store.dispose()


def serve_env(project, **extra) -> dict:
    import os

    env = {name: value for name, value in os.environ.items() if name != "AUDIENCES_FAULT_POINT"}
    return {**env, **extra}


@pytest.mark.slow
def test_a_kill_between_the_identify_and_its_events_loses_no_event(project):
    """`audiences serve` is killed (SIGKILL, at the fault point) after an identify committed and
    before its events did: the next run records the event (once, with real time's id), and a
    restarted service records a waiting user's event (once), which the next run repeats not."""
    import signal

    from api_server import serve_process
    from condition_harness import ROOT

    from audiences.workflows.realtime import FAULT_BEFORE_EVENTS

    store = MembershipStore(f"sqlite:///{project / 'store.sqlite'}").create()
    from audiences.api.keys import create_key

    headers = {"Authorization": f"Bearer {create_key(store, 'development', 'tests')[1]}"}
    admin = {"plan": "enterprise", "tags": ["admin"], "email": "x@example.com"}
    faulty = serve_env(project, AUDIENCES_FAULT_POINT=FAULT_BEFORE_EVENTS)

    def killed_after_identify(user_id):
        with serve_process(faulty, ROOT) as (url, process):
            # Killed before or while answering: the patch committed all the same.
            with contextlib.suppress(httpx.HTTPError):
                httpx.put(f"{url}/v1/users/{user_id}", json=admin, headers=headers, timeout=10)
            assert process.wait(timeout=30) == -signal.SIGKILL
        assert events_of(store, user_id) == []
        patches = tables.user_patches.c
        assert store.rows(sa.select(patches.patch).where(patches.user_id == user_id))

    expected = [
        (
            "enterprise-admins",
            "entered",
            1,
            event_id("enterprise-admins", "rt-dora", None, "entered", 1),
        )
    ]
    with dg.DagsterInstance.ephemeral() as instance:
        # The batch path records it.
        killed_after_identify("rt-dora")
        metadata = run_pipeline(instance, 15)
        assert metadata["realtime_disagreements"] == 0
        assert [e[:4] for e in events_of(store, "rt-dora")] == expected
        # A restart records it.
        killed_after_identify("rt-erin")
        with serve_process(serve_env(project), ROOT):
            deadline = time.monotonic() + 30
            while not events_of(store, "rt-erin") and time.monotonic() < deadline:
                time.sleep(0.1)
        recorded = events_of(store, "rt-erin")
        assert [e[:3] for e in recorded] == [("enterprise-admins", "entered", 1)]
        assert recorded[0][4] == "realtime"
        metadata = run_pipeline(instance, 30)
        assert metadata["realtime_disagreements"] == 0
        assert events_of(store, "rt-erin") == recorded
        assert [e[:4] for e in events_of(store, "rt-dora")] == expected
    store.dispose()


def test_each_audience_catalog_entry_says_which_path_it_takes():
    """Property audiences (and those over them) are real time; event audiences, custom SQL
    audiences and static ones say what they are."""
    defs = build_definitions()
    specs = {
        spec.key.path[-1]: spec
        for assets in defs.assets
        if isinstance(assets, dg.AssetsDefinition)
        for spec in assets.specs
        if spec.key.path[0] == "audiences"
    }
    path = {name: spec.metadata.get("evaluation_path", "") for name, spec in specs.items()}
    assert path["enterprise_admins"].startswith("real time")
    assert path["beta_invite_candidates"].startswith("real time")  # refers to power-users
    assert path["signed_up_no_order"].startswith("next run: reads behavioral events")
    assert path["high_value_accounts"].startswith("next run: a custom SQL audience")
    assert path["vip_customers"].startswith("static")
    assert path["workspace_admins_trial_ending"].startswith("next run: is evaluated per tenant")
    assert "Evaluation path: real time" in specs["enterprise_admins"].description
