"""The documented way to run the service: `audiences keys create`, then `audiences serve`, then
Knock's SDK; `audiences keys revoke` ends a key."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import knockapi
import pytest
from api_server import alive, processes_started_by, serve_process
from condition_harness import ROOT


def audiences(*arguments: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "audiences.cli", *arguments],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_keys_and_serve_commands_work_with_the_sdk(tmp_path, workers):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")},
        "AUDIENCES_DUCKDB": str(tmp_path / "warehouse.duckdb"),
        "AUDIENCES_DEFINITIONS": str(ROOT / "data" / "audiences"),
    }
    created = audiences("keys", "create", "--name", "ci", env=env)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("sk_development_")
    key_id = created.stdout.split()[2]
    with serve_process(env, ROOT, workers=workers) as (url, service):
        started = processes_started_by(service.pid)
        assert len(started) >= workers  # uvicorn's worker processes (and the worker process)
        knock = knockapi.Knock(api_key=secret, base_url=url, max_retries=0)
        knock.audiences.add_members(
            "vip-customers", members=[{"user": {"id": "from-sdk"}, "tenant": "acme"}]
        )
        assert [
            (m.user_id, m.tenant) for m in knock.audiences.list_members("vip-customers").entries
        ] == [("from-sdk", "acme")]
        listed = audiences("keys", "list", env=env)
        assert key_id in listed.stdout and secret not in listed.stdout
        assert audiences("keys", "revoke", key_id, env=env).returncode == 0
        with pytest.raises(knockapi.AuthenticationError):
            knock.audiences.list_members("vip-customers")
    # Nothing the service started outlives the harness's end (uvicorn's worker processes did).
    deadline = time.monotonic() + 10
    while any(map(alive, started)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in started if alive(pid)]
