"""A promotion's dry run predicts what the promotion then does (issue 15): on the sample data
(3,000 users, events, tenants), production evaluated by a real promotion, five audiences changed
(one over properties, one read by another changed one and that one, one counting events, one per
tenant) and one created; the dry run's members now and after, entered and exited equal, per
audience, what the real promotion's evaluation records (members in production's warehouse,
events in its store), and the dry run says which audiences it evaluated on their own."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections import Counter

import pytest
from condition_harness import ROOT

from audiences import cli

pytestmark = pytest.mark.slow

FIRST, LATER = "2026-11-01T08:00:00Z", "2026-11-02T08:00:00Z"


def run(capsys, *arguments: str) -> str:
    code = cli.main(list(arguments))
    out, err = capsys.readouterr()
    assert code == 0, f"audiences {' '.join(arguments)} failed:\n{out}\n{err}"
    return out


def edit(folder, key: str, change) -> None:
    path = folder / "data" / "audiences" / key / "audience.json"
    definition = json.loads(path.read_text())
    change(definition)
    path.write_text(json.dumps(definition, indent=2))


def recorded(store, at: str) -> tuple[Counter, Counter]:
    """Per audience, the entered and exited events production's evaluation at `at` recorded."""
    with sqlite3.connect(store) as connection:
        rows = connection.execute(
            "select audience_key, event_type from membership_events where occurred_at like ?",
            (at.removesuffix("Z") + "%",),
        ).fetchall()
    entered = Counter(key for key, kind in rows if kind == "entered")
    exited = Counter(key for key, kind in rows if kind == "exited")
    return entered, exited


def production_members(warehouse) -> Counter:
    import duckdb

    with duckdb.connect(str(warehouse), read_only=True) as connection:
        return Counter(
            dict(
                connection.execute(
                    "select audience_key, count(*) from main.audience_members group by all"
                ).fetchall()
            )
        )


def test_a_dry_run_predicts_the_promotions_entered_and_exited(tmp_path, monkeypatch, capsys):
    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        if name != "AUDIENCES_DBT_PROJECT":  # the session's copy of the engine's project
            monkeypatch.delenv(name)
    monkeypatch.setenv("AUDIENCES_AUTHOR", "ana")
    folder = tmp_path / "project"
    shutil.copytree(ROOT / "data", folder / "data", ignore=shutil.ignore_patterns("out"))
    (folder / "data" / "production").mkdir()
    (folder / "data" / "production" / "sinks.yml").write_text(
        "default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n"
    )
    monkeypatch.chdir(folder)
    run(capsys, "commit", "-m", "the sample's audiences")
    run(capsys, "--evaluation-time", FIRST, "promote", "--to", "production")

    def widen_power_users(definition):  # two segments: the second without its recency
        definition["segments"][1]["conditions"].pop()

    def no_optout_rule(definition):  # reads power-users, changed too
        definition["segments"][0]["conditions"].pop()

    def two_orders(definition):  # an event condition
        definition["segments"][0]["conditions"][0]["argument"]["count"] = {"at_least": 2}

    def any_role(definition):  # per tenant
        definition["segments"][0]["conditions"].pop()

    def not_eu(definition):
        definition["segments"][0]["conditions"][0]["operator"] = "not_contains"

    edit(folder, "power-users", widen_power_users)
    edit(folder, "beta-invite-candidates", no_optout_rule)
    edit(folder, "frequent-buyers", two_orders)
    edit(folder, "workspace-admins-trial-ending", any_role)
    edit(folder, "eu-customers", not_eu)
    created = folder / "data" / "audiences" / "pro-plan"
    created.mkdir()
    (created / "audience.json").write_text(
        json.dumps(
            {
                "name": "Pro plan",
                "type": "dynamic",
                "segments": [
                    {
                        "conditions": [
                            {
                                "property": "recipient.plan",
                                "operator": "equal_to",
                                "argument": "pro",
                            }
                        ]
                    }
                ],
            }
        )
    )
    run(capsys, "commit", "-m", "six changes")
    production = folder / "data" / "production"
    members_before = production_members(production / "warehouse.duckdb")

    planned = json.loads(
        run(
            capsys,
            "--evaluation-time",
            LATER,
            "promote",
            "--to",
            "production",
            "--dry-run",
            "--json",
        )
    )
    text = run(capsys, "--evaluation-time", LATER, "promote", "--to", "production", "--dry-run")
    run(capsys, "--evaluation-time", LATER, "promote", "--to", "production")

    impact = {each["audience_key"]: each for each in planned["impact"]["audiences"]}
    assert set(impact) == {
        "power-users",
        "beta-invite-candidates",
        "frequent-buyers",
        "workspace-admins-trial-ending",
        "eu-customers",
        "pro-plan",
    }
    entered, exited = recorded(production / "store.sqlite", LATER)
    members_after = production_members(production / "warehouse.duckdb")
    for key, each in impact.items():
        assert each["members_now"] == members_before[key], key
        assert each["members_after"] == members_after[key], key
        if each["is_new"]:  # its first members are recorded with no events (no backfill)
            assert (entered[key], exited[key]) == (0, 0), key
            continue
        assert (each["entered"], each["exited"]) == (entered[key], exited[key]), key
    # The changes are not empty: each kind moved someone.
    assert all(each["entered"] + each["exited"] > 0 for each in impact.values()), impact
    assert impact["pro-plan"]["is_new"] and impact["pro-plan"]["members_now"] == 0
    # Which audiences were evaluated on their own, and why, in the JSON and the text.
    assert {key: each["method"] for key, each in impact.items()} == {
        "power-users": "scan",
        "beta-invite-candidates": "scan",  # over power-users' new members
        "frequent-buyers": "alone: event conditions",
        "workspace-admins-trial-ending": "alone: per tenant",
        "eu-customers": "scan",
        "pro-plan": "scan",
    }
    assert "evaluated on its own (event conditions)" in text
