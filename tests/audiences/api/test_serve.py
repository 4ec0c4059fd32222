"""The documented way to run the service: `audiences keys create`, then `audiences serve`, then
Knock's SDK; `audiences keys revoke` ends a key."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import knockapi
import pytest

from api_server import free_port
from condition_harness import ROOT


def audiences(*arguments: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "audiences.cli", *arguments], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("workers", [1, 2])
def test_keys_and_serve_commands_work_with_the_sdk(tmp_path, workers):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")},
           "AUDIENCES_DUCKDB": str(tmp_path / "warehouse.duckdb"),
           "AUDIENCES_DEFINITIONS": str(ROOT / "data" / "audiences")}
    created = audiences("keys", "create", "--name", "ci", env=env)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("sk_development_")
    key_id = created.stdout.split()[2]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "audiences.cli", "serve", "--port", str(port),
                               "--workers", str(workers)], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the service did not start"
            time.sleep(0.2)
        knock = knockapi.Knock(api_key=secret, base_url=url, max_retries=0)
        knock.audiences.add_members("vip-customers", members=[{"user": {"id": "from-sdk"}, "tenant": "acme"}])
        assert [(m.user_id, m.tenant) for m in knock.audiences.list_members("vip-customers").entries] == [
            ("from-sdk", "acme")]
        listed = audiences("keys", "list", env=env)
        assert key_id in listed.stdout and secret not in listed.stdout
        assert audiences("keys", "revoke", key_id, env=env).returncode == 0
        with pytest.raises(knockapi.AuthenticationError):
            knock.audiences.list_members("vip-customers")
    finally:
        server.terminate()
        server.wait(timeout=30)
