"""Load benchmark of the HTTP API, on loopback only, bounded in time.

    .venv/bin/python bench/api.py                       # 8 clients x 30 s of adds, checks at 10M members
    .venv/bin/python bench/api.py --check-members 1000000 --seconds 10   # a quicker run

Measured in one run, against `audiences serve` started as its own process (uvicorn, one worker) on
127.0.0.1 with a fresh SQLite store:

1. **Adds.** With `audiences serve --workers 2` (one process per core; a one-worker run is
   reported beside it), 8 concurrent clients (one asyncio task each, one key each: eight integrations, each
   under Knock's default 60 writes a second) send `POST /v1/audiences/bench/members` with batches of
   1,000 new members for `--seconds`. Every member is a real add: a membership row and an `entered`
   event, in one transaction per batch. Reported: members a second, p50 / p99 latency, errors.
   Target: over 20,000 members a second, no errors, p99 under 250 ms, on 2 cores.
2. **Adds with inline identify.** The same, each member carrying `name`, `email` and a custom
   property, so each batch also writes 1,000 user profiles and 1,000 queued identify patches.
3. **Membership checks** `GET /v1/audiences/big/members/{user_id}?tenant=...` against an audience of
   `--check-members` members (10M by default, bulk-loaded into the store before the server starts;
   half the checks hit members, half miss), one client, one request at a time, so the latency is
   the service's own. The read rate limit is raised for this phase (a single key would otherwise
   be held to Knock's 200 reads a second). Target: p99 under 5 ms at 10M members.

4. **Adds through Knock's SDK** (`knockapi`'s `AsyncKnock`, 8 tasks, `add_members` with batches
   of 1,000): the SDK sends an `Idempotency-Key` on every write, which the server claims and
   records in the write's transaction.
5. **Bulk identify** of `--bulk-users` users (100k by default) through the SDK's
   `users.bulk.identify`, 1,000 a request (Knock's limit), then `bulk_operations.get` until every
   operation is `completed`: users a second from the first request to the last completion.
6. **Merges** through the SDK's `users.merge`, 4 clients for `--seconds`: each merges a user who
   is a member of a static audience and has properties into another (properties merged, the
   membership moved with an `exited` and an `entered` event, the merged user deleted).

Rate limits are per environment and tier (Knock's): the benchmark measures the server, so it
raises every tier's limit. `--phases adds,sdk_adds,...` runs some phases only; their results then
go to `bench/api-results-<phases>.md` and `.json` instead of `bench/api-results.md` and `.json`.
Data lives in `bench/data/api/` (ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from audiences.api.keys import create_key  # noqa: E402
from audiences.store.database import MembershipStore  # noqa: E402

DATA = ROOT / "bench" / "data" / "api"
PHASES = (
    "adds",
    "adds_with_identify",
    "adds_one_worker",
    "sdk_adds",
    "bulk_identify",
    "merges",
    "checks",
)
CLIENTS = 8
BATCH = 1000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]
        if ordered
        else float("nan")
    )


class Server:
    """`audiences serve` in its own process, on a free loopback port."""

    def __init__(self, folder: Path, environ: dict[str, str], workers: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The server's output, for the server's life; `stop()` closes it.
        self.log = open(folder / f"serve-{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "audiences.cli",
                "serve",
                "--port",
                str(self.port),
                "--workers",
                str(workers),
            ],
            cwd=ROOT,
            env={**os.environ, **environ},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the server did not start; see {self.log.name}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def environment_for(folder: Path, **extra: str) -> dict[str, str]:
    definitions = folder / "audiences"
    for key in ("bench", "big"):
        (definitions / key).mkdir(parents=True, exist_ok=True)
        (definitions / key / "audience.json").write_text(
            json.dumps({"name": key, "type": "static"})
        )
    return {
        "AUDIENCES_DUCKDB": str(folder / "warehouse.duckdb"),
        "AUDIENCES_DEFINITIONS": str(definitions),
        "AUDIENCES_STORE_URL": f"sqlite:///{folder / 'store.sqlite'}",
        "AUDIENCES_API_ENVIRONMENTS": "development",
        # Limits are per environment (Knock's scope): the clients here are one environment.
        **{f"AUDIENCES_API_{tier}_RATE": "1000000" for tier in ("READ", "WRITE", "DELETE", "BULK")},
        **extra,
    }


async def add_load(url: str, keys: list[str], seconds: float, identify: bool, label: str) -> dict:
    """Each client sends batches of new members back to back until the time is up."""
    latencies: list[float] = []
    errors: list[str] = []
    members = 0
    stop_at = time.monotonic() + seconds

    def body(client: int, batch: int) -> bytes:
        def user(number: int) -> dict:
            user_id = f"{label}-c{client}-b{batch}-m{number}"
            if not identify:
                return {"id": user_id}
            return {
                "id": user_id,
                "name": f"User {number}",
                "email": f"{user_id}@example.com",
                "plan": random.choice(["free", "pro", "enterprise"]),
            }

        return json.dumps(
            {"members": [{"user": user(number), "tenant": None} for number in range(BATCH)]}
        ).encode()

    async def client(number: int) -> None:
        nonlocal members
        headers = {"Authorization": f"Bearer {keys[number]}", "content-type": "application/json"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
            batch = 0
            payload = body(number, batch)
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    response = await http.post("/v1/audiences/bench/members", content=payload)
                    status = response.status_code
                except httpx.HTTPError as error:
                    status, response = None, error
                latencies.append(time.perf_counter() - started)
                if status == 204:
                    members += BATCH
                else:
                    errors.append(f"{status}: {getattr(response, 'text', response)!s:.200}")
                batch += 1
                payload = body(
                    number, batch
                )  # built while nothing is waited for: client cost, not latency

    started = time.perf_counter()
    await asyncio.gather(*(client(number) for number in range(CLIENTS)))
    wall = time.perf_counter() - started
    return {
        "clients": CLIENTS,
        "batch": BATCH,
        "inline_identify": identify,
        "seconds": round(wall, 2),
        "requests": len(latencies),
        "members": members,
        "members_per_second": round(members / wall),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
        "errors": len(errors),
        "error_samples": errors[:3],
    }


async def sdk_add_load(url: str, key: str, seconds: float) -> dict:
    """Adds through Knock's SDK: 8 tasks, batches of 1,000 new members, each with the
    `Idempotency-Key` the SDK sends on every write."""
    import knockapi

    latencies: list[float] = []
    errors: list[str] = []
    members = 0
    stop_at = time.monotonic() + seconds
    knock = knockapi.AsyncKnock(api_key=key, base_url=url, max_retries=0, timeout=30)

    async def client(number: int) -> None:
        nonlocal members
        batch = 0
        while time.monotonic() < stop_at:
            batch_members = [
                {"user": {"id": f"sdk-c{number}-b{batch}-m{index}"}} for index in range(BATCH)
            ]
            started = time.perf_counter()
            try:
                await knock.audiences.add_members("bench", members=batch_members)
                members += BATCH
            except knockapi.APIError as error:
                errors.append(f"{error!s:.200}")
            latencies.append(time.perf_counter() - started)
            batch += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(number) for number in range(CLIENTS)))
    wall = time.perf_counter() - started
    await knock.close()
    return {
        "clients": CLIENTS,
        "batch": BATCH,
        "seconds": round(wall, 2),
        "requests": len(latencies),
        "members": members,
        "members_per_second": round(members / wall),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "errors": len(errors),
        "error_samples": errors[:3],
    }


def bulk_identify_load(url: str, key: str, users: int) -> dict:
    """Bulk identify `users` users through the SDK, 1,000 a request, and wait for every
    operation to complete."""
    import knockapi

    knock = knockapi.Knock(api_key=key, base_url=url, max_retries=0, timeout=60)
    started = time.perf_counter()
    operations = []
    for first in range(0, users, BATCH):
        batch = [
            {"id": f"bulk-{number:07d}", "name": f"User {number}", "plan": "pro"}
            for number in range(first, min(first + BATCH, users))
        ]
        operations.append(knock.users.bulk.identify(users=batch).id)
    submitted = time.perf_counter() - started
    pending, final = list(operations), {}
    while pending:
        for operation_id in list(pending):
            operation = knock.bulk_operations.get(operation_id)
            if operation.status in ("completed", "failed"):
                final[operation_id] = operation
                pending.remove(operation_id)
        if pending:
            time.sleep(0.05)
    completed = time.perf_counter() - started
    knock.close()
    return {
        "users": users,
        "requests": len(operations),
        "submit_seconds": round(submitted, 2),
        "seconds_to_completed": round(completed, 2),
        "users_per_second": round(users / completed),
        "succeeded": sum(operation.success_count for operation in final.values()),
        "errors": sum(operation.error_count or 0 for operation in final.values()),
        "failed_operations": sum(op.status == "failed" for op in final.values()),
    }


async def merge_load(url: str, key: str, seconds: float, pairs: int) -> dict:
    """Merges through the SDK, 4 clients: `pairs` pairs of users are identified and the merged
    ones added to the static audience `bench` first (bulk identify, adds), then merged."""
    import knockapi

    setup = knockapi.Knock(api_key=key, base_url=url, max_retries=0, timeout=60)
    operations = []
    for first in range(0, pairs, BATCH):
        numbers = range(first, min(first + BATCH, pairs))
        for users in (
            [{"id": f"kept-{n}", "name": "Kept", "plan": "pro"} for n in numbers],
            [{"id": f"old-{n}", "seats": n, "profile": {"source": "old"}} for n in numbers],
        ):
            operations.append(setup.users.bulk.identify(users=users).id)
        setup.audiences.add_members(
            "bench", members=[{"user": {"id": f"old-{n}"}, "tenant": "acme"} for n in numbers]
        )
    for operation_id in operations:  # the users are identified before the merges start
        while setup.bulk_operations.get(operation_id).status not in ("completed", "failed"):
            time.sleep(0.1)
    setup.close()
    clients = 4
    latencies: list[float] = []
    errors: list[str] = []
    merged = 0
    stop_at = time.monotonic() + seconds
    next_pair = iter(range(pairs))
    knock = knockapi.AsyncKnock(api_key=key, base_url=url, max_retries=0, timeout=30)

    async def client() -> None:
        nonlocal merged
        for number in next_pair:
            if time.monotonic() >= stop_at:
                return
            started = time.perf_counter()
            try:
                await knock.users.merge(f"kept-{number}", from_user_id=f"old-{number}")
                merged += 1
            except knockapi.APIError as error:
                errors.append(f"{error!s:.200}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    await knock.close()
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "merges": merged,
        "merges_per_second": round(merged / wall, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "errors": len(errors),
        "error_samples": errors[:3],
        "ran_out_of_pairs": merged + len(errors) >= pairs,
    }


def load_members(store_path: Path, audience: str, count: int) -> float:
    """Bulk-load an audience of `count` members straight into the store (a third with tenants)."""
    started = time.perf_counter()
    connection = sqlite3.connect(store_path)
    connection.execute("pragma journal_mode = wal")
    connection.execute("pragma synchronous = off")
    connection.execute("pragma cache_size = -1000000")
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def rows():
        for number in range(count):
            tenant = f"tenant-{number % 50}" if number % 3 == 0 else None
            yield audience, f"user-{number:09d}", tenant or "", tenant, stamp

    connection.execute("begin")
    connection.executemany(
        "insert into audience_members (audience_key, user_id, tenant_key, tenant, added_at) "
        "values (?, ?, ?, ?, ?)",
        rows(),
    )
    connection.execute("commit")
    connection.close()
    return time.perf_counter() - started


def check_load(url: str, key: str, count: int, requests: int) -> dict:
    rng = random.Random(7)
    latencies: list[float] = []
    hits = errors = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
        for number in range(requests + 200):
            user = rng.randrange(count * 2)  # half of them are not members
            tenant = f"tenant-{user % 50}" if user % 3 == 0 else None
            params = {"tenant": tenant} if tenant else {}
            started = time.perf_counter()
            response = http.get(f"/v1/audiences/big/members/user-{user:09d}", params=params)
            elapsed = time.perf_counter() - started
            if number < 200:
                continue  # warm-up: connections, caches
            latencies.append(elapsed)
            if response.status_code != 200:
                errors += 1
            else:
                hits += response.json()["member"]
    return {
        "members": count,
        "requests": len(latencies),
        "members_found": hits,
        "errors": errors,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="length of each add phase (default 30)"
    )
    parser.add_argument(
        "--check-members", type=int, default=10_000_000, help="audience size for checks"
    )
    parser.add_argument("--checks", type=int, default=5000, help="membership checks to time")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="server worker processes for the add phases "
        "(default 2, one per core; a 1-worker run is reported too)",
    )
    parser.add_argument(
        "--bulk-users", type=int, default=100_000, help="users to bulk identify (default 100k)"
    )
    parser.add_argument(
        "--merge-pairs", type=int, default=20_000, help="user pairs prepared for merges"
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated phases to run (default all: {','.join(PHASES)})",
    )
    options = parser.parse_args()
    phases = [phase.strip() for phase in options.phases.split(",") if phase.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {', '.join(unknown)}; phases: {', '.join(PHASES)}")
    command = ".venv/bin/python bench/api.py " + " ".join(sys.argv[1:])
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir(parents=True)
    results: dict = {
        "command": command,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg()[0],
    }

    for phase, identify, workers in (
        ("adds", False, options.workers),
        ("adds_with_identify", True, options.workers),
        ("adds_one_worker", False, 1),
    ):
        if phase not in phases:
            continue
        folder = DATA / phase
        folder.mkdir()
        environ = environment_for(folder)
        store = MembershipStore(environ["AUDIENCES_STORE_URL"]).create()
        keys = [
            create_key(store, "development", f"client-{number}")[1] for number in range(CLIENTS)
        ]
        store.dispose()
        server = Server(folder, environ, workers)
        try:
            print(
                f"{phase}: {CLIENTS} clients x {options.seconds:g} s, {workers} server worker(s) ...",
                flush=True,
            )
            results[phase] = {
                **asyncio.run(add_load(server.url, keys, options.seconds, identify, phase)),
                "server_workers": workers,
            }
        finally:
            server.stop()
        print(f"  {results[phase]}", flush=True)

    for phase in ("sdk_adds", "bulk_identify", "merges"):
        if phase not in phases:
            continue
        folder = DATA / phase
        folder.mkdir()
        environ = environment_for(folder)
        store = MembershipStore(environ["AUDIENCES_STORE_URL"]).create()
        key = create_key(store, "development", phase)[1]
        store.dispose()
        server = Server(folder, environ, options.workers)
        try:
            print(f"{phase}: {options.workers} server worker(s) ...", flush=True)
            if phase == "sdk_adds":
                result = asyncio.run(sdk_add_load(server.url, key, options.seconds))
            elif phase == "bulk_identify":
                result = bulk_identify_load(server.url, key, options.bulk_users)
            else:
                result = asyncio.run(
                    merge_load(server.url, key, options.seconds, options.merge_pairs)
                )
            results[phase] = {**result, "server_workers": options.workers}
        finally:
            server.stop()
        print(f"  {results[phase]}", flush=True)

    if "checks" in phases:
        run_checks(options, results)
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    name = "api-results" if phases == list(PHASES) else "api-results-" + "-".join(phases)
    (ROOT / "bench" / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (ROOT / "bench" / f"{name}.md").write_text(report(results))
    print((ROOT / "bench" / f"{name}.md").read_text())


def run_checks(options, results: dict) -> None:
    folder = DATA / "checks"
    folder.mkdir()
    environ = environment_for(folder, AUDIENCES_API_READ_RATE="1000000")
    store = MembershipStore(environ["AUDIENCES_STORE_URL"]).create()
    key = create_key(store, "development", "checks")[1]
    store.dispose()
    print(f"checks: loading {options.check_members:,} members ...", flush=True)
    loaded = load_members(folder / "store.sqlite", "big", options.check_members)
    server = Server(folder, environ)
    try:
        results["checks"] = check_load(server.url, key, options.check_members, options.checks)
        results["checks"]["bulk_load_seconds"] = round(loaded, 1)
    finally:
        server.stop()
    print(f"  {results['checks']}", flush=True)


def report(results: dict) -> str:
    """The results as markdown: every phase that ran, and the targets' verdicts."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = [
        "# API load benchmark",
        "",
        f"`{results['command']}`, started {results['started_at']}, {results['cpus']} CPUs, load average before "
        f"{results['load_average_before']:.2f}. Server: `audiences serve --workers N` (uvicorn) on 127.0.0.1, "
        "a fresh SQLite store per phase; clients in another process. With 8 clients each waiting for its answer, "
        "the mean latency is 8 ÷ requests a second (Little's law): a mean under 250 ms alone takes over 32 "
        "requests (32,000 members) a second, and the p99 more. "
        "See the docstring of `bench/api.py` for what each phase does.",
        "",
    ]
    adds_rows = [
        (name, results[phase])
        for phase, name in (
            ("adds", "adds, 8 clients, batches of 1,000, {workers} workers"),
            ("adds_with_identify", "adds with inline identify, {workers} workers"),
            ("adds_one_worker", "adds, 8 clients, batches of 1,000, 1 worker"),
            ("sdk_adds", "adds through Knock's SDK (Idempotency-Key on each), {workers} workers"),
        )
        if phase in results
    ]
    if adds_rows:
        lines += [
            "| phase | requests | members/s | p50 ms | p99 ms | max ms | errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in adds_rows:
            lines.append(
                f"| {name.format(workers=row['server_workers'])} | {row['requests']:,} | "
                f"{row['members_per_second']:,} | {row['p50_ms']} | {row['p99_ms']} | "
                f"{row.get('max_ms', '')} | {row['errors']} |"
            )
        lines.append("")
    for phase, label in (("adds", "with {workers} workers"), ("adds_one_worker", "with one")):
        if phase in results:
            row = results[phase]
            ok = row["members_per_second"] > 20_000 and row["errors"] == 0 and row["p99_ms"] < 250
            lines.append(
                "Adds target (over 20,000 members/s, no errors, p99 under 250 ms) "
                f"{label.format(workers=row['server_workers'])}: {verdict(ok)}."
            )
    if "bulk_identify" in results:
        bulk = results["bulk_identify"]
        lines += [
            "",
            "| bulk identify | requests | users | submitted in s | completed in s | users/s | errors |",
            "|---|---|---|---|---|---|---|",
            f"| SDK `users.bulk.identify`, 1,000 a request, {bulk['server_workers']} workers | "
            f"{bulk['requests']:,} | {bulk['users']:,} | {bulk['submit_seconds']} | "
            f"{bulk['seconds_to_completed']} | {bulk['users_per_second']:,} | "
            f"{bulk['errors'] + bulk['failed_operations']} |",
        ]
    if "merges" in results:
        merges = results["merges"]
        lines += [
            "",
            "| merges | merges | merges/s | p50 ms | p99 ms | errors |",
            "|---|---|---|---|---|---|",
            f"| SDK `users.merge`, {merges['clients']} clients, {merges['server_workers']} workers, "
            f"a static membership and properties each | {merges['merges']:,} | "
            f"{merges['merges_per_second']} | {merges['p50_ms']} | {merges['p99_ms']} | "
            f"{merges['errors']} |",
        ]
    if "checks" in results:
        checks = results["checks"]
        lines += [
            "",
            "| membership checks | requests | p50 ms | p99 ms | max ms | errors |",
            "|---|---|---|---|---|---|",
            f"| {checks['members']:,} members, one client | {checks['requests']:,} | "
            f"{checks['p50_ms']} | {checks['p99_ms']} | {checks['max_ms']} | {checks['errors']} |",
            "",
            f"Checks target (p99 under 5 ms at 10M members): "
            f"{verdict(checks['p99_ms'] < 5 and checks['members'] >= 10_000_000 and checks['errors'] == 0)}"
            + (
                ""
                if checks["members"] >= 10_000_000
                else f" (this run used {checks['members']:,} members)"
            )
            + ".",
        ]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
