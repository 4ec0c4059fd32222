"""A merge (`POST /v1/users/{id}/merge`) moves dynamic memberships too: the next evaluation sees
the merged user deleted and the kept user with the merged properties, and records the events."""

from __future__ import annotations

from datetime import datetime

import dagster as dg
import duckdb
import sqlalchemy as sa
from condition_harness import copy_sample_run

from audiences.static.merge import merge_users
from audiences.store.database import MembershipStore, membership_events
from audiences.store.profiles import get_profile, identify
from pipelines import build_definitions


def test_a_merge_moves_dynamic_memberships_at_the_next_evaluation(
    sample_run, tmp_path, monkeypatch
):
    copy_sample_run(sample_run, tmp_path)
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("AUDIENCES_SINKS", str(tmp_path / "sinks.yml"))
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        [(merged_away,)] = connection.execute(
            "select user_id from audiences.enterprise_admins order by user_id limit 1"
        ).fetchall()
    store = MembershipStore(f"sqlite:///{tmp_path / 'store.sqlite'}").create()
    assert get_profile(store, merged_away) is not None  # published by the sample run
    with store.engine.begin() as connection:  # what the merge route does
        identify(store, connection, [("signed-in-ada", {"name": "Ada"})])
        kept, moved = merge_users(store, connection, "signed-in-ada", merged_away, set())
    assert kept.properties["name"] == "Ada" and moved == 0

    def events(user_id: str) -> set[str]:
        columns = membership_events.c
        return {
            row["event_type"]
            for row in store.rows(
                sa.select(columns.event_type).where(
                    columns.audience_key == "enterprise-admins", columns.user_id == user_id
                )
            )
        }

    defs = build_definitions()
    tick = datetime.fromisoformat("2026-11-01T00:15:00+00:00")
    with dg.DagsterInstance.ephemeral() as instance:
        schedule = defs.resolve_schedule_def("reevaluate_every_15_minutes")
        [request] = schedule.evaluate_tick(
            dg.build_schedule_context(instance=instance, scheduled_execution_time=tick)
        ).run_requests
        result = defs.resolve_job_def(
            request.job_name or "reevaluate_audiences"
        ).execute_in_process(run_config=request.run_config, instance=instance, tags=request.tags)
        assert result.success
    assert "exited" in events(merged_away)
    assert events("signed-in-ada") == {"entered"}
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        members = {
            user_id
            for (user_id,) in connection.execute(
                "select user_id from audiences.enterprise_admins"
            ).fetchall()
        }
    assert "signed-in-ada" in members and merged_away not in members
    store.dispose()
