"""Clients adding and removing members through the API while a pipeline run materializes the
audiences: afterwards the membership is exactly what the API acknowledged, and every real change
has its event."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections import Counter

import httpx
import pytest
import sqlalchemy as sa
from api_server import running_server
from condition_harness import ROOT, SAMPLE_TIME

from audiences.api.app import close_app

pytestmark = pytest.mark.slow

AUDIENCE = "vip-customers"  # the sample data's static audience
CLIENTS = 4


def test_api_writes_during_a_pipeline_run_are_all_kept_with_their_events(tmp_path, monkeypatch):
    from audiences.api.app import asgi_app
    from audiences.api.keys import create_key
    from audiences.settings import Settings
    from audiences.store import database as tables
    from audiences.store.database import MembershipStore

    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AUDIENCES_API_WRITE_RATE", "100000")
    store_url = f"sqlite:///{tmp_path}/store.sqlite"
    warehouse = tmp_path / "warehouse.duckdb"
    (tmp_path / "sinks.yml").write_text(
        "default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n"
    )
    settings = Settings.from_env(
        duckdb_path=warehouse, definitions_dir=ROOT / "data" / "audiences", store_url=store_url
    )
    secret = create_key(MembershipStore(store_url).create(), "development", "concurrency")[1]

    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "audiences.cli",
            "--duckdb",
            str(warehouse),
            "--store",
            store_url,
            "--sinks",
            str(tmp_path / "sinks.yml"),
            "--evaluation-time",
            SAMPLE_TIME,
            "run",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")}},
    )

    app = asgi_app(settings)
    acknowledged: list[Counter] = [Counter() for _ in range(CLIENTS)]
    models: list[set] = [set() for _ in range(CLIENTS)]
    errors: list[str] = []

    def client(number: int, url: str) -> None:
        rng = random.Random(number)
        pool = [(f"c{number}-u{user}", rng.choice([None, "acme", "globex"])) for user in range(300)]
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=60
        ) as http:
            while run.poll() is None or sum(acknowledged[number].values()) < 20:
                action = rng.choice(["add", "add", "remove"])
                batch = rng.sample(pool, rng.randint(1, 150))
                body = {
                    "members": [
                        {
                            "user": {"id": user, "batch_plan": rng.choice(["a", "b"])}
                            if action == "add"
                            else {"id": user},
                            "tenant": tenant,
                        }
                        for user, tenant in batch
                    ]
                }
                response = http.request(
                    "POST" if action == "add" else "DELETE",
                    f"/v1/audiences/{AUDIENCE}/members",
                    json=body,
                )
                if response.status_code != 204:
                    errors.append(f"{response.status_code} {response.text[:300]}")
                    return
                for member in dict.fromkeys(batch):  # a member listed twice in a batch counts once
                    if action == "add" and member not in models[number]:
                        models[number].add(member)
                        acknowledged[number][(member, "entered")] += 1
                    elif action == "remove" and member in models[number]:
                        models[number].discard(member)
                        acknowledged[number][(member, "exited")] += 1

    with running_server(app) as url:
        threads = [threading.Thread(target=client, args=(number, url)) for number in range(CLIENTS)]
        for thread in threads:
            thread.start()
        output, _ = run.communicate(timeout=600)
        for thread in threads:
            thread.join(timeout=120)
    close_app(app.app)

    assert run.returncode == 0, output[-3000:]
    assert not errors, errors[:5]
    store = MembershipStore(store_url)
    members, events = tables.audience_members, tables.membership_events
    stored = {
        (row["user_id"], row["tenant"])
        for row in store.rows(
            sa.select(members.c.user_id, members.c.tenant).where(
                members.c.audience_key == AUDIENCE, members.c.user_id.like("c%-u%")
            )
        )
    }
    assert stored == set().union(*models)
    counted = Counter(
        ((row["user_id"], row["tenant"]), row["event_type"])
        for row in store.rows(
            sa.select(events.c.user_id, events.c.tenant, events.c.event_type).where(
                events.c.audience_key == AUDIENCE, events.c.user_id.like("c%-u%")
            )
        )
    )
    expected = sum(acknowledged, Counter())
    assert counted == expected and sum(expected.values()) > 0
    store.dispose()
