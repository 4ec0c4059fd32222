"""Per-tenant audiences re-evaluated by (user, tenant) pairs (issue 18 item 3): a build after a
change re-evaluates only the pairs whose user, tenant or membership changed, or whose tenant's
timestamp "now" moved over, and gives the members and events a full evaluation gives."""

from __future__ import annotations

import copy
import json
import shutil
from datetime import timedelta

import duckdb
import pytest
from condition_harness import NOW, ROOT

from audiences.dbt.project import generate, prepare, run_dbt
from audiences.membership.changes import record_changes
from audiences.settings import Settings
from audiences.users import load_source
from audiences.users.sources import UserSource
from audiences.warehouse.evaluation import set_evaluation_clock
from pipelines.defs.audiences import REEVALUATED_MODELS

pytestmark = pytest.mark.slow  # four real dbt builds

DEFINITIONS = {
    # per user, read by a per-tenant audience (inlined over the pairs' users)
    "active-users": {
        "name": "Active users",
        "type": "dynamic",
        "segments": [
            {
                "conditions": [
                    {"property": "recipient.active", "operator": "equal_to", "argument": True}
                ]
            }
        ],
    },
    "pro-admins": {
        "name": "Active admins of pro workspaces",
        "type": "dynamic",
        "tenancy": "per_tenant",
        "segments": [
            {
                "conditions": [
                    {"property": "tenant.plan", "operator": "equal_to", "argument": "pro"},
                    {"property": "membership.role", "operator": "equal_to", "argument": "admin"},
                    {
                        "property": "recipient",
                        "operator": "is_audience_member",
                        "argument": "active-users",
                    },
                ]
            }
        ],
    },
    # compares a tenant's timestamp with "now": its pairs move as "now" moves
    "trial-ending": {
        "name": "Members of workspaces whose trial ends within a week",
        "type": "dynamic",
        "tenancy": "per_tenant",
        "segments": [
            {
                "conditions": [
                    {
                        "property": "tenant.trial_ends_at",
                        "operator": "is_timestamp_on_or_after_now",
                    },
                    {
                        "property": "tenant.trial_ends_at",
                        "operator": "is_timestamp_before",
                        "argument": "7 days from now",
                    },
                ]
            }
        ],
    },
    # reads a per-tenant audience: the pair's membership of it, inlined over the same pairs
    "trial-admins": {
        "name": "Admins of workspaces whose trial ends within a week",
        "type": "dynamic",
        "tenancy": "per_tenant",
        "segments": [
            {
                "conditions": [
                    {"property": "membership.role", "operator": "equal_to", "argument": "admin"},
                    {
                        "property": "recipient",
                        "operator": "is_audience_member",
                        "argument": "trial-ending",
                    },
                ]
            }
        ],
    },
    # compares a membership's timestamp with "now"
    "newcomers": {
        "name": "Members who joined a workspace in the last two days",
        "type": "dynamic",
        "tenancy": "per_tenant",
        "segments": [
            {
                "conditions": [
                    {
                        "property": "membership.joined_at",
                        "operator": "is_timestamp_on_or_after",
                        "argument": "2 days ago",
                    }
                ]
            }
        ],
    },
}
PER_TENANT = ("pro-admins", "trial-ending", "trial-admins", "newcomers")


def day(days: float) -> str:
    return (NOW + timedelta(days=days)).isoformat().replace("+00:00", "Z")


def initial_data() -> tuple[dict, dict, dict]:
    """20 users in 6 workspaces, each user in one to three of them."""
    users = {f"u{n:02d}": {"id": f"u{n:02d}", "active": n % 4 != 0} for n in range(1, 21)}
    tenants = {
        f"t{n}": {"id": f"t{n}", "name": f"Workspace {n}", "plan": "pro" if n % 2 else "free"}
        for n in range(1, 7)
    }
    tenants["t2"]["trial_ends_at"] = day(3)
    tenants["t4"]["trial_ends_at"] = day(9)  # enters "trial-ending" when "now" moves 3 days
    tenants["t6"]["trial_ends_at"] = day(30)
    memberships = {}
    for n in range(1, 21):
        for t in sorted({n % 6 + 1, (n * 5) % 6 + 1, 6 if n % 7 == 0 else n % 6 + 1}):
            # (u09 is t4's one admin: it enters "trial-admins" with t4's trial)
            role = "admin" if (n + t) % 3 == 0 or (n, t) == (9, 4) else "member"
            memberships[(f"u{n:02d}", f"t{t}")] = {
                "user_id": f"u{n:02d}",
                "tenant_id": f"t{t}",
                "role": role,
                # joined a day ago (leaves "newcomers" when "now" moves 3 days) or long ago
                "joined_at": day(-1) if (n + t) % 5 == 0 else day(-100),
            }
    return users, tenants, memberships


class Workspace:
    """A warehouse, its dbt project and snapshot sources of users, tenants and memberships."""

    def __init__(self, folder):
        self.folder = folder
        project = folder / "dbt_project"
        shutil.copytree(
            ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs")
        )
        shutil.rmtree(project / "models" / "audiences" / "custom")
        for key, document in DEFINITIONS.items():
            (folder / "audiences" / key).mkdir(parents=True)
            (folder / "audiences" / key / "audience.json").write_text(json.dumps(document))
        self.warehouse = folder / "warehouse.duckdb"
        self.settings = Settings.from_env(
            {},
            duckdb_path=self.warehouse,
            definitions_dir=folder / "audiences",
            dbt_project_dir=project,
        )
        generate(self.settings)
        prepare(self.settings)
        self.now = NOW
        self.loads = 0
        self.previous_members: set = set()

    def load(self, users: dict, tenants: dict, memberships: dict) -> None:
        """Load the three snapshots, as the `users` asset does, a minute after the last load."""
        self.loads += 1
        loaded_at = NOW + timedelta(minutes=self.loads)
        with duckdb.connect(str(self.warehouse)) as connection:
            for kind, rows in (
                ("users", users.values()),
                ("tenants", tenants.values()),
                ("tenant_memberships", memberships.values()),
            ):
                path = self.folder / f"{kind}.jsonl"
                path.write_text("".join(json.dumps(row) + "\n" for row in rows))
                load_source(connection, UserSource(kind, "jsonl", path, kind=kind), loaded_at)

    def build(self, now, everything: bool = False) -> dict:
        """One incremental dbt build at `now` and the membership diff after it: what the build
        re-evaluated (its log, read before the diff empties it) and the events the diff queued."""
        self.now = now
        with duckdb.connect(str(self.warehouse)) as connection:
            set_evaluation_clock(connection, now)
        # the first build (and one after a definition changed) runs every model; then what a run
        # rebuilds while the definitions are unchanged
        whole = now == NOW or everything
        run_dbt(["run"] if whole else ["run", "--select", *REEVALUATED_MODELS], self.settings)
        with duckdb.connect(str(self.warehouse)) as connection:
            log = connection.execute(
                "select audience_key, users.user_id from main.audience_members__reevaluated "
                "left join raw.users as users using (user_key)"
            ).fetchall()
            record_changes(connection, now)
            events = connection.execute(
                "select event_type, audience_key, user_id, tenant from raw.membership_outbox "
                "where occurred_at = $now",
                {"now": now},
            ).fetchall()
            members = self.members(connection)
            views = self.views(connection)
            open_intervals = set(
                connection.execute(
                    "select audience_key, user_id, tenant from raw.membership_intervals "
                    "where exited_at is null"
                ).fetchall()
            )
        # The incremental members are what every audience's view, evaluated whole, holds; the
        # events are what a full evaluation's diff gives: the difference with the last members.
        assert members == views
        assert open_intervals == views
        full_events = {("entered", *row) for row in views - self.previous_members} | {
            ("exited", *row) for row in self.previous_members - views
        }
        assert set(events) == full_events
        assert len(events) == len(full_events)
        self.previous_members = views
        return {"log": set(log), "events": full_events}

    @staticmethod
    def members(connection) -> set:
        return set(
            connection.execute(
                "select audience_key, users.user_id, members.tenant "
                "from main.audience_members as members join raw.users as users using (user_key)"
            ).fetchall()
        )

    @staticmethod
    def views(connection) -> set:
        rows = set()
        for key, model in connection.execute(
            "select audience_key, model_name from main.audience_catalog"
        ).fetchall():
            rows |= {
                (key, *row)
                for row in connection.execute(
                    f'select user_id, tenant from audiences."{model}"'
                ).fetchall()
            }
        return rows


def reevaluated_pairs(log: set) -> dict:
    """Per per-tenant audience, the users the build re-evaluated by pairs; `None` when it was
    evaluated whole."""
    result = {}
    for key in PER_TENANT:
        if (key, None) in log:
            result[key] = None
        else:
            result[key] = {user for audience, user in log if audience == key}
    return result


def users_of(memberships: dict, tenant: str) -> set:
    return {user for user, t in memberships if t == tenant}


def newcomers(memberships: dict, tenant: str | None = None) -> set:
    """The (user, tenant) memberships that joined a day before NOW."""
    return {
        pair
        for pair, row in memberships.items()
        if row.get("joined_at") == day(-1) and tenant in (None, pair[1])
    }


def admins_of(memberships: dict, tenant: str) -> set:
    return {
        user for (user, t), row in memberships.items() if t == tenant and row["role"] == "admin"
    }


def tenant_times(warehouse) -> dict:
    """audience_members' table of the tenants' timestamps (issue 18): per tenant id, when its
    row was written, whether it is current, its change time and the typed
    trial end."""
    with duckdb.connect(str(warehouse)) as connection:
        (table,) = connection.execute(
            "select table_name from information_schema.tables "
            "where table_name like 'audience_members__tenant_times_%'"
        ).fetchone()
        return {
            tenant: rest
            for tenant, *rest in connection.execute(
                f'select tenant, extracted_at, is_current, updated_at, "tenant:trial_ends_at__timestamp" '
                f"from main.{table}"
            ).fetchall()
        }


def raw_tenants(warehouse) -> dict:
    with duckdb.connect(str(warehouse)) as connection:
        return dict(connection.execute("select tenant_id, updated_at from raw.tenants").fetchall())


def test_per_tenant_audiences_reevaluate_only_the_changed_pairs(tmp_path):
    space = Workspace(tmp_path)
    users, tenants, memberships = initial_data()
    space.load(users, tenants, memberships)
    first = space.build(NOW)
    assert first["events"]  # the first build evaluates everything
    assert {row[1] for row in first["events"]} >= set(DEFINITIONS)

    # 1. a tenant's plan changes (its members' pairs are re-evaluated, not every user's), and
    # memberships are added, removed and change role; one names a user not loaded yet (kept, no
    # pair)
    tenants["t2"]["plan"] = "pro"
    added, removed, promoted = ("u01", "t3"), ("u04", "t3"), ("u02", "t3")
    assert added not in memberships and removed in memberships and promoted in memberships
    memberships[added] = {"user_id": "u01", "tenant_id": "t3", "role": "admin"}
    memberships[("u21", "t1")] = {"user_id": "u21", "tenant_id": "t1", "role": "admin"}
    del memberships[removed]
    memberships[promoted] = {**memberships[promoted], "role": "admin"}
    space.load(users, tenants, memberships)
    step = space.build(NOW + timedelta(minutes=20))
    assert {event[1:] for event in step["events"] if event[0] == "entered"} == {
        ("pro-admins", "u01", "t3"),
        ("pro-admins", "u02", "t3"),
        # t2's active admins
        *{("pro-admins", user, "t2") for user in ("u01", "u07", "u13", "u19")},
    }
    assert {event[0] for event in step["events"]} == {"entered"}
    expected = users_of(memberships, "t2") | {"u01", "u02", "u04"}
    assert reevaluated_pairs(step["log"]) == {key: expected for key in PER_TENANT}
    # The tenants' timestamps the windows compare with "now", typed in a table (filled by the
    # first build by pairs): every row is the loaded tenant's, its trial end read as the
    # audience reads it.
    times = tenant_times(space.warehouse)
    assert {t: row[2] for t, row in times.items()} == raw_tenants(space.warehouse)
    assert {t: row[3] for t, row in times.items() if row[3] is not None} == {
        t: NOW + timedelta(days=d) for t, d in (("t2", 3), ("t4", 9), ("t6", 30))
    }

    # 2. a user's property changes (that user's pairs, and the user in per-user audiences), the
    # user of the kept membership arrives (its pair is evaluated), and a tenant is deleted (gone
    # from the snapshot): its pairs exit
    users["u05"]["active"] = False
    users["u21"] = {"id": "u21", "active": True}
    del tenants["t3"]
    space.load(users, tenants, memberships)
    step = space.build(NOW + timedelta(minutes=30))
    assert step["events"] == {
        ("exited", "active-users", "u05", None),
        ("entered", "active-users", "u21", None),
        ("entered", "pro-admins", "u21", "t1"),
        ("exited", "pro-admins", "u01", "t3"),
        ("exited", "pro-admins", "u02", "t3"),
        *{("exited", "newcomers", *pair) for pair in newcomers(memberships, "t3")},
    }
    expected = {"u05", "u21"} | users_of(memberships, "t3")
    assert reevaluated_pairs(step["log"]) == {key: expected for key in PER_TENANT}
    # ... rewritten once per change, as the users' are: t3's row alone (deleted: kept, not
    # current, so never a pair in time)
    before, times = times, tenant_times(space.warehouse)
    assert {t for t in times if times[t][0] != before[t][0]} == {"t3"}
    assert times["t3"][1] is False and before["t3"][1] is True
    assert {t: row[2] for t, row in times.items()} == raw_tenants(space.warehouse)

    # 3. nothing changes but "now" moves 3 days: t4's trial enters the week, t2's ends; only the
    # pairs of the tenants whose timestamp "now" moved over are re-evaluated
    # (the pairs of a per-tenant audience over another per-tenant audience move with it, by pairs;
    # the memberships that joined a day ago leave "newcomers", re-evaluated by their timestamps)
    assert newcomers(memberships) - newcomers(memberships, "t3")
    step = space.build(NOW + timedelta(days=3, minutes=30))
    assert {(event[0], event[1], event[2], event[3]) for event in step["events"]} == {
        *{("entered", "trial-ending", user, "t4") for user in users_of(memberships, "t4")},
        *{("exited", "trial-ending", user, "t2") for user in users_of(memberships, "t2")},
        *{("entered", "trial-admins", user, "t4") for user in admins_of(memberships, "t4")},
        *{("exited", "trial-admins", user, "t2") for user in admins_of(memberships, "t2")},
        *{("exited", "newcomers", *pair) for pair in newcomers(memberships) if pair[1] != "t3"},
    }
    assert admins_of(memberships, "t4") and admins_of(memberships, "t2")
    expected = (
        users_of(memberships, "t4")
        | users_of(memberships, "t2")
        # (t3's too: its tenant is gone but the membership's timestamp moved; no row comes back)
        | {user for user, _ in newcomers(memberships)}
    )
    assert reevaluated_pairs(step["log"]) == {key: expected for key in PER_TENANT}
    # ... and "now" moving rewrites none: the moved windows read the typed column
    assert tenant_times(space.warehouse) == times

    # 4. a definition compares another timestamp with "now": its table of the tenants' timestamps
    # is replaced by one with the new column, filled whole, and the old one dropped; the changed
    # audience (and the one that inlines it) is evaluated whole, the others still by pairs
    document = copy.deepcopy(DEFINITIONS["trial-ending"])
    document["segments"][0]["conditions"].append(
        {"property": "tenant.renewed_at", "operator": "is_timestamp_before_now"}
    )
    path = space.folder / "audiences" / "trial-ending" / "audience.json"
    path.write_text(json.dumps(document))
    tenants["t5"]["renewed_at"] = day(1)
    space.load(users, tenants, memberships)
    generate(space.settings)
    prepare(space.settings)
    step = space.build(NOW + timedelta(days=3, minutes=40), everything=True)
    with duckdb.connect(str(space.warehouse)) as connection:
        tables = {
            name
            for (name,) in connection.execute(
                "select table_name from information_schema.tables "
                "where table_name like 'audience_members__%_times_%'"
            ).fetchall()
        }
        (table,) = tables & {t for t in tables if "tenant_times" in t}
        assert connection.execute(
            f'select tenant, "tenant:renewed_at__timestamp" from main.{table} '
            '\nwhere "tenant:renewed_at__timestamp" is not null'
        ).fetchall() == [("t5", NOW + timedelta(days=1))]
    assert len(tables) == 2  # one of the tenants' timestamps, one of the memberships'
    assert reevaluated_pairs(step["log"]) == {
        "trial-ending": None,
        "trial-admins": None,
        "pro-admins": users_of(memberships, "t5"),
        "newcomers": users_of(memberships, "t5"),
    }
