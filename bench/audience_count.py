"""How every cost grows with the number of audiences (issue 25).

    .venv/bin/python bench/audience_count.py --users 300000 --counts 50 500 2000
    # writes bench/audience-count-results.md and .json

The same synthetic users as `bench/scale.py` (`bench/data/<size>/warehouse.duckdb`), and N
audiences: the 50 of `bench/synthetic.py` repeated N/50 times under other keys (`<key>--c<copy>`),
each copy's `is_audience_member` references pointing into the same copy, so audience-of-audience
ordering is exercised at every N. For each N, in this order, on a fresh copy of the dbt project:

1. **generate**: `generate` (definitions loaded, compiled, files written), its CPU time, and the
   size of the generated files (lines, and the largest single file);
2. **generate again**: nothing changed, so nothing may be written;
3. **parse**: `dbt parse`;
4. **cold**: `dbt build --full-refresh`;
5. **warm**: 1% of users touched, "now" 15 minutes later, the dbt command the Dagster job runs
   while the definitions are unchanged (`pipelines/defs/audiences.py`, `evaluation_arguments`:
   `--exclude` the views, no JSON artifacts written);
6. **tick**: nothing changed, "now" 15 minutes later again, the same command (with
   `BENCH_TICK_WRITING_JSON=1`, the same tick again with dbt's JSON artifacts written, as before
   that cut);
7. **Dagster warm run**: 1% of users touched again, and the `reevaluate_audiences` job's
   evaluation (the definitions asset, the dbt assets, their checks) in its own process: loading
   the code location, then the run;
8. **check**: `audience_members` against every audience view evaluated whole, and against the
   independent reference evaluator (`audiences/conditions/reference.py`) on a sample of users;
9. **one definition changed**: one audience's argument edited, `generate`, `dbt parse` (partial
   parsing, as `prepare` runs it when the code location loads), and the build the Dagster job runs
   then (against the manifest of the last full build: only the changed view and what is not an
   audience view are built), and the check again.

`--reuse` measures steps 5-9 again on an earlier run's project and warehouse (generation, parsing
and the cold build are slow at 2,000 audiences on a shared machine; the earlier run with `--keep`,
or `--skip-change`, leaves them in place; step 9 toggles the same argument back); `--combine`
renders runs made separately as one table.

Each dbt command runs in its own process: *elapsed* is dbt's `elapsed_time`, *CPU* its CPU seconds
(DuckDB's threads included; the comparable figure on a shared machine), *peak* the process's
maximum resident set. The largest statement `audience_members` runs is reported too (its
branches): it must not grow with N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import scale  # noqa: E402
import synthetic  # noqa: E402

from audiences.dbt.project import build_state, generate, prepare  # noqa: E402
from audiences.settings import Settings  # noqa: E402

DATA = BENCH / "data"
NOW = scale.NOW
REFERENCE_SAMPLE = 2_000  # users evaluated by the reference evaluator, per N
# The Dagster instance of the Dagster step (`dagster_run`); `--dagster-instance` sets it.
DAGSTER_INSTANCE = "sqlite"
# Keep each N's project and definitions after the definition change (`--keep`), for a `--reuse`.
KEEP = False


def definitions_for(count: int) -> dict[str, dict]:
    """`count` audiences: the 50 synthetic ones, copied with their references kept in the copy."""
    base = synthetic.audiences()
    result: dict[str, dict] = {}
    copy = 0
    while len(result) < count:
        for key, definition in base.items():
            if len(result) == count:
                break
            new_key = key if copy == 0 else f"{key}--c{copy}"
            text = json.dumps(definition)
            if copy:
                for other in base:
                    text = text.replace(f'"argument": "{other}"', f'"argument": "{other}--c{copy}"')
            result[new_key] = json.loads(text)
        copy += 1
    return result


def write_definitions(folder: Path, count: int) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    for key, definition in definitions_for(count).items():
        (folder / key).mkdir(parents=True)
        (folder / key / "audience.json").write_text(json.dumps(definition, indent=2) + "\n")


def statement_sizes(project: Path) -> dict:
    """Lines of the generated files, and the most audiences one audience_members statement holds."""
    generated = [
        *project.glob("models/audiences/dynamic/*.sql"),
        *project.glob("macros/generated/*.sql"),
        project / "models/marts/audience_members.sql",
    ]
    lines = {path: path.read_text().count("\n") for path in generated if path.exists()}
    batches = list(project.glob("macros/generated/audience_members_batch_*.sql"))
    # every audience has one branch that evaluates it whole, from its model
    per_statement = [
        path.read_text().count(" as audience_key, user_key, tenant from") for path in batches
    ]
    if not batches:  # one statement over every audience (the code before issue 25)
        per_statement = [
            (project / "models/marts/audience_members.sql").read_text().count(" as audience_key,")
        ]
    members_lines = sum(
        n
        for path, n in lines.items()
        if "audience_members" in path.name or "generated" in str(path)
    )
    return {
        "generated_lines": sum(lines.values()),
        "largest_file_lines": max(lines.values()),
        "audience_members_lines": members_lines,
        "statements": len(per_statement),
        "largest_statement_branches": max(per_statement),
    }


def reference_check(path: Path, definitions_dir: Path, evaluated_at: datetime) -> dict:
    """The product's members of a sample of users against the reference evaluator's."""
    from audiences.conditions.definitions import evaluation_order, load_definitions
    from audiences.conditions.reference import evaluate_audience

    definitions = load_definitions(definitions_dir)
    with duckdb.connect(str(path), read_only=True) as connection:
        step = max(
            1,
            connection.execute("select count(*) from raw.users").fetchone()[0] // REFERENCE_SAMPLE,
        )
        rows = connection.execute(
            f"select user_key, user_id, properties from raw.users "
            f"where deleted_at is null and user_key % {step} = 0"
        ).fetchall()
        keys = [row[0] for row in rows]
        product = {
            (audience, user)
            for audience, user in connection.execute(
                "select audience_key, user_key from main.audience_members "
                "where tenant is null and list_contains($keys, user_key)",
                {"keys": keys},
            ).fetchall()
        }
    users = {key: {**json.loads(properties), "id": user_id} for key, user_id, properties in rows}
    members: dict[str, set[str]] = {}
    expected = set()
    for audience in evaluation_order(definitions):
        members[audience] = {
            user["id"]
            for user in users.values()
            if evaluate_audience(
                definitions[audience].raw,
                user,
                now=evaluated_at,
                is_member=lambda other, user_id: user_id in members.get(other, ()),
            )
        }
        expected |= {
            (audience, key) for key, user in users.items() if user["id"] in members[audience]
        }
    return {
        "sample_users": len(users),
        "expected": len(expected),
        "missing": len(expected - product),
        "extra": len(product - expected),
        "ok": expected == product,
    }


def parse(settings: Settings) -> dict:
    """`prepare` as the code location runs it when it loads: its checks and `dbt parse` (it
    records the project's fingerprint, so the Dagster run below finds the manifest current).
    dbt runs in this process (`audiences/dbt/runner.py`), imported by the first parse of a run
    as the code location imports it once; CPU is this process's and any child's."""
    os.environ["DBT_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time()
    prepare(settings)
    cpu = time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_s": time.perf_counter() - start,
        "cpu_s": cpu + after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
    }


def scale_fingerprint(settings: Settings) -> str | None:
    """The fingerprint the warehouse was last fully built from (`raw.dbt_full_builds`)."""
    from audiences.warehouse.evaluation import last_full_build

    with duckdb.connect(str(settings.duckdb_path)) as connection:
        return last_full_build(connection)


def record_full_build(settings: Settings) -> None:
    """What the Dagster asset records after a full build (the cold one here): the fingerprint the
    warehouse was built from, and its manifest as the state later runs compare with."""
    from audiences.dbt.project import keep_build_state, project_fingerprint
    from audiences.warehouse.evaluation import record_full_build as record

    fingerprint = project_fingerprint(settings.dbt_project_dir)
    with duckdb.connect(str(settings.duckdb_path)) as connection:
        record(connection, fingerprint)
    keep_build_state(settings.dbt_project_dir, fingerprint)


def dagster_environment(settings: Settings, folder: Path) -> dict[str, str]:
    """The code location's settings for this N: everything under the bench's data folder, and a
    Dagster instance folder of its own (new for each run of the bench)."""
    sources = folder / "sources.yml"
    sources.write_text(
        "# The benchmark loads users straight into raw.users: no sources.\nsources: []\n"
    )
    (folder / "workflows").mkdir(exist_ok=True)
    return {
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DO_NOT_TRACK": "1",
        "AUDIENCES_DUCKDB": str(settings.duckdb_path),
        "AUDIENCES_DEFINITIONS": str(settings.definitions_dir),
        "AUDIENCES_DBT_PROJECT": str(settings.dbt_project_dir),
        "AUDIENCES_SOURCES": str(sources),
        "AUDIENCES_STORE_URL": f"sqlite:///{folder / 'store.sqlite'}",
        "AUDIENCES_WORKFLOWS": str(folder / "workflows"),
        "DAGSTER_HOME": str(folder / f"dagster_home_{settings.dbt_project_dir.name}"),
    }


def dagster_run(environment: dict[str, str], evaluation_time: str, instance: str) -> dict:
    """One `reevaluate_audiences` evaluation through Dagster, in its own process: the code
    location loaded (`load_s`), then the definitions asset, the dbt assets and their checks
    (`execute_s`: dagster-dbt, dbt, one materialization per audience). Peak memory is the largest
    of that process and the dbt it starts. `instance`: `sqlite`, a Dagster instance folder as
    users have (`DAGSTER_HOME`: `audiences run`, `dg dev`, the daemon; SQLite files, with
    `pipelines/defs/dagster_storage.py`'s connections kept open), or `ephemeral` (in memory,
    Dagster's `DagsterInstance.ephemeral()`, which opens a connection per use: what this bench
    measured before)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, __file__, "--dagster-child", evaluation_time, instance],
        env={**os.environ, **environment},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"the Dagster run failed:\n{output[-4000:]}")
    result = json.loads(output.strip().splitlines()[-1])
    return {
        **result,
        "wall_s": time.perf_counter() - start,
        "cpu_s": usage.ru_utime
        + usage.ru_stime
        + result["dbt_cpu_s"]
        - result.get("counting_cpu_s", 0.0),
        "peak_rss_mb": max(usage.ru_maxrss / 1024, result["dbt_peak_rss_mb"]),
    }


def dagster_child(evaluation_time: str, instance_kind: str = "ephemeral") -> dict:
    start = time.perf_counter()
    import dagster as dg

    from audiences.settings import prepare_dagster_home
    from pipelines.definitions import defs

    job = defs.resolve_job_def("reevaluate_audiences")
    # The evaluation only: the definitions asset, the dbt assets and their checks (the membership
    # diff, publishing and deliveries come after it and do not depend on N's models), and `users`
    # (with no sources, it loads nothing), whose checks are dbt's source tests: the whole dbt
    # asset, as the job selects it (dbt gets `fqn:*`). A subset would get a bounded selection
    # too (`dbt_selection`); before that, one selector per model (2,009 at 2,000 audiences).
    selection = sorted(
        {
            key
            for assets in defs.assets
            if isinstance(assets, dg.AssetsDefinition)
            and assets.op.name in ("users", "audience_definitions", "audience_models")
            for key in assets.keys
        },
        key=str,
    )
    loaded = time.perf_counter()
    load_cpu = time.process_time()
    opened = (
        dg.DagsterInstance.ephemeral()
        if instance_kind == "ephemeral"
        else dg.DagsterInstance.from_config(
            str(prepare_dagster_home(Path(os.environ["DAGSTER_HOME"])))
        )
    )
    # The SQLite transactions the run commits (Dagster's history: the run's file, the index, runs).
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    commits = [0]
    event.listen(Engine, "commit", lambda connection: commits.__setitem__(0, commits[0] + 1))
    with opened as instance:
        result = job.execute_in_process(
            run_config={
                "ops": {"audience_models": {"config": {"evaluation_time": evaluation_time}}}
            },
            instance=instance,
            asset_selection=selection,
        )
        if not result.success:
            raise RuntimeError("the Dagster run failed")
        materialized = len(result.get_asset_materialization_events())
        finished, finished_cpu = time.perf_counter(), time.process_time()
        stored = len(instance.all_logs(result.run_id))  # counted outside the run's CPU
        counting_cpu = time.process_time() - finished_cpu
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "load_s": loaded - start,
        "execute_s": finished - loaded,
        # CPU of this process (dbt runs in it) loading the code location, and running: what a run
        # forked from a warm code location (`pipelines/fork_server.py`) pays is the run's.
        "load_cpu_s": load_cpu,
        "execute_cpu_s": finished_cpu - load_cpu,
        "counting_cpu_s": counting_cpu,
        "materializations": materialized,
        "events_stored": stored,
        "sqlite_commits": commits[0],
        "dbt_cpu_s": children.ru_utime + children.ru_stime,
        "dbt_peak_rss_mb": children.ru_maxrss / 1024,
    }


def run_count(
    count: int, users: int, folder: Path, skip_change: bool = False, previous: dict | None = None
) -> dict:
    """Every step at N=`count`. Given `previous` (this N's results of an earlier run whose project
    and warehouse are still in `folder`, `--reuse`), generation, parsing and the cold build are
    taken from it and the other steps measured again on its warehouse, later in time."""
    project = folder / f"dbt_project_{count}"
    definitions_dir = folder / f"audiences_{count}"
    # Each N its own warehouse, so that a later run can reuse the builds of every N (a run before
    # this option kept one, warehouse.duckdb, for all of them).
    warehouse = folder / f"warehouse-{count}.duckdb"
    if previous is not None:
        warehouse = Path(previous.get("warehouse", folder / "warehouse.duckdb"))
    settings = Settings.from_env(
        {},
        duckdb_path=warehouse,
        definitions_dir=definitions_dir,
        dbt_project_dir=project,
        store_url=f"sqlite:///{folder / 'store.sqlite'}",
    )
    reuse = (
        previous is not None
        and (project / "target" / "partial_parse.msgpack").exists()
        and settings.duckdb_path.exists()
        and not generate(settings)  # the same generated files
    )
    r: dict = {"audiences": count, "users": users, "warehouse": str(warehouse), "runs": {}}
    if reuse:
        r["reused"] = {"from": previous["started"], "steps": ["generate", "parse", "cold"]}
        for name in ("generate", "generate_again", "sizes"):
            r[name] = previous[name]
        r["runs"]["parse"] = previous["runs"]["parse"]
        r["runs"]["cold"] = previous["runs"]["cold"]
        prepare(settings)  # partial parsing: nothing changed since
        record_full_build(settings)
        clock = datetime.fromisoformat(scale.in_child("clock", path=settings.duckdb_path)["now"])
        base = clock + timedelta(minutes=15)
        return measure(r, count, settings, folder, base, skip_change, reuse=True)
    if project.exists():
        shutil.rmtree(project)
    shutil.copytree(
        ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs", ".user.yml")
    )
    shutil.rmtree(project / "models" / "audiences" / "custom", ignore_errors=True)
    write_definitions(definitions_dir, count)
    r.update(scale.in_child("reset", path=settings.duckdb_path, users=users))

    cpu, wall = time.process_time(), time.perf_counter()
    written = generate(settings)
    r["generate"] = {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "files_written": len(written),
    }
    cpu, wall = time.process_time(), time.perf_counter()
    written = generate(settings)
    r["generate_again"] = {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "files_written": len(written),
    }
    r["sizes"] = statement_sizes(project)
    print(count, "generate", r["generate"], r["generate_again"], r["sizes"], flush=True)
    r["runs"]["parse"] = parse(settings)
    return measure(r, count, settings, folder, NOW, skip_change)


def measure(
    r: dict,
    count: int,
    settings: Settings,
    folder: Path,
    base: datetime,
    skip_change: bool,
    reuse: bool = False,
) -> dict:
    """The builds from the cold one on (without it when `reuse`), at times from `base` on."""
    project, definitions_dir = settings.dbt_project_dir, settings.definitions_dir
    from pipelines.defs.audiences import LEAN_FLAGS, evaluation_arguments

    lean = evaluation_arguments(lean=True, state=None)
    steps = [
        ("cold", 0, None, ["build", "--full-refresh"]),
        ("warm", 15, 1, lean),
        ("tick", 30, None, lean),
        # The same tick as dbt ran it before issue 25's cut: its JSON artifacts written and every
        # schema's relations cached (what `LEAN_FLAGS` leaves out).
        ("tick_writing_json", 40, None, [a for a in lean if a not in LEAN_FLAGS]),
    ]
    if not os.environ.get("BENCH_TICK_WRITING_JSON"):  # one more build: left out unless asked
        steps.pop()
    for name, minutes, touch, arguments in steps[1:] if reuse else steps:
        scale.in_child(
            "step",
            path=settings.duckdb_path,
            touch=touch,
            now=(base + timedelta(minutes=minutes)).isoformat(),
        )
        r["runs"][name] = scale.dbt(settings, arguments)
        print(count, name, {k: v for k, v in r["runs"][name].items() if k != "slowest"}, flush=True)
        if name == "cold":
            record_full_build(settings)
    # The Dagster warm run: 1% of users touched again, the `reevaluate_audiences` job's evaluation.
    evaluated_at = base + timedelta(minutes=45)
    scale.in_child("step", path=settings.duckdb_path, touch=2, now=evaluated_at.isoformat())
    environment = dagster_environment(settings, folder)
    shutil.rmtree(environment["DAGSTER_HOME"], ignore_errors=True)
    r["runs"]["dagster_warm"] = dagster_run(environment, evaluated_at.isoformat(), DAGSTER_INSTANCE)
    r["runs"]["dagster_warm"]["instance"] = DAGSTER_INSTANCE
    print(count, "dagster warm", r["runs"]["dagster_warm"], flush=True)
    r["check"] = scale.in_child("check", path=settings.duckdb_path)
    r["reference"] = reference_check(settings.duckdb_path, definitions_dir, evaluated_at)
    print(count, "check", r["check"], r["reference"], flush=True)
    if skip_change:
        return r
    # One definition changed: its argument edited, generated again, parsed again (partial parsing:
    # `prepare`, as the code location does when it loads), and the build that the Dagster job runs
    # then: against the manifest of the last full build, only the changed view is rebuilt.
    changed = definitions_dir / "free-plan" / "audience.json"
    text = changed.read_text()
    # Toggled, so that a later `--reuse` run of a kept project (`--keep`) changes it again.
    edited = text.replace('"free"', '"starter"')
    changed.write_text(edited if edited != text else text.replace('"starter"', '"free"'))
    cpu, wall = time.process_time(), time.perf_counter()
    written = generate(settings)
    r["generate_one_changed"] = {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "files_written": len(written),
    }
    state = build_state(project, scale_fingerprint(settings))
    r["runs"]["one_definition_changed_parse"] = parse(settings)
    scale.in_child(
        "step",
        path=settings.duckdb_path,
        touch=None,
        now=(base + timedelta(minutes=60)).isoformat(),
    )
    r["runs"]["one_definition_changed"] = scale.dbt(
        settings, evaluation_arguments(lean=False, state=state)
    )
    one = r["runs"]["one_definition_changed"]
    one["total_wall_s"] = (
        r["generate_one_changed"]["wall_s"]
        + r["runs"]["one_definition_changed_parse"]["wall_s"]
        + one["wall_s"]
    )
    one["total_cpu_s"] = (
        r["generate_one_changed"]["cpu_s"]
        + r["runs"]["one_definition_changed_parse"]["cpu_s"]
        + one["cpu_s"]
    )
    print(
        count,
        "one changed",
        r["generate_one_changed"],
        {k: v for k, v in one.items() if k != "slowest"},
        flush=True,
    )
    r["check_after_change"] = scale.in_child("check", path=settings.duckdb_path)
    print(count, "check after the change", r["check_after_change"], flush=True)
    if not KEEP:
        shutil.rmtree(project, ignore_errors=True)
        shutil.rmtree(definitions_dir, ignore_errors=True)
    return r


def render(document: dict) -> str:
    counts = [r["audiences"] for r in document["results"]]
    first = document["results"][0]
    command = document["command"]
    command = command if command.startswith("`") else f"`{command}`"
    lines = [
        "# Thousands of audiences",
        "",
        f"Produced by {command} on {document['started']} "
        f"({document['machine']['cores']} cores, Python {document['machine']['python']}, "
        f"DuckDB {document['machine']['duckdb']}); single runs on a shared machine. "
        f"{first['users']:,} synthetic users. What each step is: the docstring of `bench/audience_count.py`.",
        "",
        "| step | " + " | ".join(f"N={n:,}" for n in counts) + f" | {counts[-1]} ÷ {counts[0]} |",
        "|---|" + "---:|" * (len(counts) + 1),
    ]

    def row(label, values, unit="s", digits=1):
        cells = [f"{v:,.{digits}f} {unit}".strip() for v in values]
        ratio = values[-1] / values[0] if values[0] else float("nan")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.1f}x |")

    results = document["results"]
    row("`generate` (wall)", [r["generate"]["wall_s"] for r in results], digits=2)
    row(
        "`generate` again, nothing changed",
        [r["generate_again"]["wall_s"] for r in results],
        digits=2,
    )
    row("files written by it", [r["generate_again"]["files_written"] for r in results], "", 0)
    row("generated lines", [r["sizes"]["generated_lines"] for r in results], "", 0)
    row(
        "largest generated file (lines)", [r["sizes"]["largest_file_lines"] for r in results], "", 0
    )
    row("audience_members statements", [r["sizes"]["statements"] for r in results], "", 0)
    row(
        "audiences in its largest statement",
        [r["sizes"]["largest_statement_branches"] for r in results],
        "",
        0,
    )
    row("`dbt parse` (wall)", [r["runs"]["parse"]["wall_s"] for r in results])
    for name, label in (
        ("cold", "cold build"),
        ("warm", "warm build, 1% of users changed"),
        ("tick", "schedule tick"),
        ("tick_writing_json", "schedule tick, dbt's JSON written (before the cut)"),
        ("dagster_warm", "Dagster warm run, 1% of users changed"),
        ("one_definition_changed", "one definition changed: build"),
    ):
        if not all(name in r["runs"] for r in results):
            continue
        runs = [r["runs"][name] for r in results]
        row(f"{label} (wall)", [run["wall_s"] for run in runs])
        if any("cpu_s" in run for run in runs):  # not measured by runs before it was
            row(f"{label} (CPU)", [run.get("cpu_s", float("nan")) for run in runs])
        if "evaluation_s" in runs[0]:
            row(f"{label} (dbt elapsed)", [run["evaluation_s"] for run in runs])
        if "execute_s" in runs[0]:
            row(f"{label}: loading the code location", [run["load_s"] for run in runs])
            row(f"{label}: the run", [run["execute_s"] for run in runs])
        row(f"{label} (peak memory)", [run["peak_rss_mb"] for run in runs], "MB", 0)
    if all("total_wall_s" in r["runs"].get("one_definition_changed", {}) for r in results):
        runs = [r["runs"]["one_definition_changed"] for r in results]
        row(
            "one definition changed: generate + parse + build (wall)",
            [run["total_wall_s"] for run in runs],
        )
        row(
            "one definition changed: generate + parse + build (CPU)",
            [run["total_cpu_s"] for run in runs],
        )
    if all("generate_one_changed" in r for r in results):
        row(
            "one definition changed: `generate`",
            [r["generate_one_changed"]["wall_s"] for r in results],
            digits=2,
        )
        row(
            "... files it wrote",
            [r["generate_one_changed"]["files_written"] for r in results],
            "",
            0,
        )
    if all("check" in r for r in results):
        row("memberships", [r["check"]["members"] for r in results], "", 0)
    for r in results:
        if "reused" in r:
            lines += [
                "",
                f"N={r['audiences']:,}: {', '.join(r['reused']['steps'])} are those of the run of "
                f"{r['reused']['from']} (`--reuse`: the same generated project and warehouse), "
                "the other steps measured again on its warehouse.",
            ]
    lines += ["", *targets(results)]
    lines += [
        "",
        "Correctness, at every N: `audience_members` against every audience view evaluated whole, "
        "and against the reference evaluator on a sample of users:",
        "",
    ]
    for r in results:
        if "check" not in r:
            lines.append(f"- N={r['audiences']:,}: not checked (the run was stopped before it)")
            continue
        c, ref = r["check"], r["reference"]
        lines.append(
            f"- N={r['audiences']:,}: views {c['missing']} missing, {c['extra']} extra; reference "
            f"({ref['sample_users']:,} users, {ref['expected']:,} memberships) {ref['missing']} missing, "
            f"{ref['extra']} extra: **{'OK' if c['ok'] and ref['ok'] else 'MISMATCH'}**"
        )
    return "\n".join(lines) + "\n"


def targets(results: list[dict]) -> list[str]:
    """Issue 25's targets, each ratio against its limit (the largest N against the smallest)."""
    first, last = results[0], results[-1]
    if first is last:
        return []
    lines = [
        f"Issue 25's targets, N={last['audiences']:,} against N={first['audiences']:,} "
        "(CPU seconds are the comparable figure on a shared machine):",
        "",
        "| target | wall | CPU | limit | met (CPU) |",
        "|---|---:|---:|---:|---|",
    ]

    def ratio(label, a, b, limit):
        wall = a["wall_s"] / b["wall_s"]
        cpu = a["cpu_s"] / b["cpu_s"] if a.get("cpu_s") and b.get("cpu_s") else float("nan")
        measured = cpu if cpu == cpu else wall  # CPU not measured (a reused run): wall
        met = "yes" if measured <= limit else "no"
        lines.append(f"| {label} | {wall:.1f}x | {cpu:.1f}x | {limit}x | {met} |")

    ratio("`generate`", last["generate"], first["generate"], 40)
    ratio("`dbt parse`", last["runs"]["parse"], first["runs"]["parse"], 40)
    for name, label, limit in (
        ("cold", "cold build", 40),
        ("warm", "warm build, 1% of users changed", 3),
        ("tick", "schedule tick", 3),
        ("dagster_warm", "Dagster warm run", 3),
    ):
        if name in last["runs"] and name in first["runs"]:
            ratio(label, last["runs"][name], first["runs"][name], limit)
    one = last["runs"].get("one_definition_changed", {})
    if "total_wall_s" in one:
        total = {"wall_s": one["total_wall_s"], "cpu_s": one["total_cpu_s"]}
        ratio(
            f"one definition changed (generate + parse + build) ÷ warm build, N={last['audiences']:,}",
            total,
            last["runs"]["warm"],
            2,
        )
    for name, label in (("warm", "warm build"), ("dagster_warm", "Dagster warm run")):
        if name in last["runs"]:
            peak = last["runs"][name]["peak_rss_mb"]
            lines.append(
                f"| {label}, peak memory at N={last['audiences']:,} | {peak:,.0f} MB | | 1,024 MB | "
                f"{'yes' if peak < 1024 else 'no'} |"
            )
    return lines


def main() -> None:
    global DAGSTER_INSTANCE, KEEP
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=300_000)
    parser.add_argument("--counts", type=int, nargs="+", default=[50, 500, 2000])
    parser.add_argument(
        "--output", default="audience-count-results", help="file name in bench/, no suffix"
    )
    parser.add_argument(
        "--skip-change",
        action="store_true",
        help="leave out step 7 (one definition changed: a full build, as long as a cold one)",
    )
    parser.add_argument(
        "--reuse",
        metavar="RESULTS",
        help="an earlier run's results (file name in bench/, no suffix) whose projects and "
        "warehouses are still in bench/data/: for the N it measured, generation, parsing and the "
        "cold build are taken from it, and the other steps measured again",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="RESULTS",
        help="render the results of runs made separately (file names in bench/, no suffix), "
        "e.g. each N in its own process, as one table into --output; measures nothing",
    )
    parser.add_argument(
        "--dagster-instance",
        choices=["sqlite", "ephemeral"],
        default=DAGSTER_INSTANCE,
        help="the Dagster run's instance: a SQLite instance folder, as users have (default), or "
        "Dagster's in-memory ephemeral one (what runs before issue 25's fifth pass measured)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep each N's project and definitions after the definition change, so that a later "
        "`--reuse` run measures the steps from the warm build on again (the change toggles back)",
    )
    options = parser.parse_args()
    DAGSTER_INSTANCE = options.dagster_instance
    KEEP = options.keep
    if options.combine:
        documents = [json.loads((BENCH / f"{name}.json").read_text()) for name in options.combine]
        document = {
            **documents[0],
            "command": "; ".join(f"`{d['command']}`" for d in documents),
            "results": sorted(
                (r for d in documents for r in d["results"]), key=lambda r: r["audiences"]
            ),
        }
        (BENCH / f"{options.output}.json").write_text(json.dumps(document, indent=1, default=str))
        (BENCH / f"{options.output}.md").write_text(render(document))
        print(render(document))
        return
    previous = {}
    if options.reuse:
        earlier = json.loads((BENCH / f"{options.reuse}.json").read_text())
        previous = {
            r["audiences"]: {**r, "started": earlier["started"]} for r in earlier["results"]
        }
    folder = DATA / f"audience-count-{options.users}"
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "command": "bench/audience_count.py " + " ".join(sys.argv[1:]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "duckdb": duckdb.__version__,
        },
        "results": [
            run_count(count, options.users, folder, options.skip_change, previous.get(count))
            for count in options.counts
        ],
    }
    (BENCH / f"{options.output}.json").write_text(json.dumps(document, indent=1, default=str))
    (BENCH / f"{options.output}.md").write_text(render(document))
    print(render(document))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--dagster-child":
        print(json.dumps(dagster_child(*sys.argv[2:4])))
    else:
        main()
