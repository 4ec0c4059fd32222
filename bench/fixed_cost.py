"""Benchmark: the fixed cost of a warm Dagster evaluation run, dbt in the run's process or in a
subprocess, or launched through the fork server (issue 17 item 4). One measured run per process,
as a scheduled run starts, or runs handed to a warm fork server, as the daemon launches them.

    .venv/bin/python bench/fixed_cost.py FOLDER TIME inprocess|subprocess
    .venv/bin/python bench/fixed_cost.py FOLDER TIME forkserver [RUNS]

FOLDER holds a warehouse that has been evaluated before (`w.duckdb`), its dbt project (`dbt`),
store (`store.sqlite`) and sinks (`sinks.yml`): README command 1 pointed there with `--duckdb`,
`--dbt-project`, `--store` and `--sinks`. TIME is a later evaluation time than the last one. The run
is the `reevaluate_audiences` job restricted to the evaluation (the definitions and the dbt
assets), as `bench/run.py`'s Dagster step runs it. `forkserver` launches it through the instance's
run launcher (`pipelines/fork_server.py`, a Dagster instance in FOLDER/dagster_home_fork) RUNS
times (default 3), an hour of evaluation time apart: the first starts the fork server (cold), the
others are forked from it (warm); each run's wall is from the launch to the run's end as the
instance records it, the launching process's own imports and definitions left out (the daemon's). Printed as one JSON line: the process's wall
time from its start (imports and definitions included), the evaluation (dbt's first node start to
its last node end, from the command's dbt.log), their ratio, CPU seconds of this process and of its
children (a dbt subprocess), and whether dbt skipped parsing. Alternate the two modes: the machine
is shared and its load moves.
"""

import contextlib
import json
import os
import resource
import sys
import time
from datetime import datetime
from pathlib import Path

START = time.perf_counter()


def main() -> None:
    folder, when, mode = Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3]
    os.environ.update(
        {
            "AUDIENCES_DUCKDB": str(folder / "w.duckdb"),
            "AUDIENCES_DBT_PROJECT": str(folder / "dbt"),
            "AUDIENCES_STORE_URL": f"sqlite:///{folder}/store.sqlite",
            "AUDIENCES_SINKS": str(folder / "sinks.yml"),
        }
    )
    import dagster as dg

    if mode == "forkserver":
        fork_server_runs(folder, when, int(sys.argv[4]) if len(sys.argv) > 4 else 3)
        return
    import pipelines.defs.resources as resources

    if mode == "subprocess":  # dagster-dbt's own way: a new Python per dbt command
        resources.dbt_in_this_process = contextlib.nullcontext
    from pipelines.definitions import defs

    job = defs.resolve_job_def("reevaluate_audiences")
    ops = {"audience_definitions", "audience_models"}
    selection = sorted(
        {
            key
            for assets in defs.assets
            if isinstance(assets, dg.AssetsDefinition) and assets.op.name in ops
            for key in assets.keys
        },
        key=str,
    )
    loaded = time.perf_counter()
    result = job.execute_in_process(
        run_config={"ops": {"audience_models": {"config": {"evaluation_time": when}}}},
        instance=dg.DagsterInstance.ephemeral(),
        asset_selection=selection,
    )
    done = time.perf_counter()
    assert result.success
    evaluation, skipped = last_evaluation(folder)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "mode": mode,
                "load_s": round(loaded - START, 2),
                "execute_s": round(done - loaded, 2),
                "wall_s": round(done - START, 2),
                "evaluation_s": round(evaluation, 2),
                "ratio": round((done - START) / evaluation, 1),
                "cpu_self_s": round(own.ru_utime + own.ru_stime, 2),
                "cpu_children_s": round(children.ru_utime + children.ru_stime, 2),
                "parse": "skipped" if skipped else "parsed",
                "load_average": os.getloadavg()[0],
            }
        )
    )


def _last_dbt_log(folder: Path) -> list[dict]:
    log = max((folder / "dbt" / "target").glob("*/dbt.log"), key=lambda p: p.stat().st_mtime)
    return [json.loads(line) for line in log.read_text().splitlines()]


def evaluation_bounds(folder: Path) -> tuple[float, float]:
    """The last dbt command's first node's start and last node's end (epoch seconds)."""
    events = _last_dbt_log(folder)

    def at(event) -> float:
        return datetime.fromisoformat(event["info"]["ts"].replace("Z", "+00:00")).timestamp()

    starts = [at(e) for e in events if e["info"]["name"] == "NodeStart"]
    ends = [at(e) for e in events if e["info"]["name"] == "NodeFinished"]
    return min(starts), max(ends)


def last_evaluation(folder: Path) -> tuple[float, bool]:
    """The last dbt command's evaluation (its first node's start to its last node's end, from its
    dbt.log) and whether it skipped parsing."""
    first, last = evaluation_bounds(folder)
    skipped = any(e["info"]["name"] == "PartialParsingSkipParsing" for e in _last_dbt_log(folder))
    return last - first, skipped


def fork_server_runs(folder: Path, when: str, runs: int) -> None:
    """`runs` evaluation runs launched through the fork server's run launcher, one after another."""
    from datetime import timedelta

    import dagster as dg
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    from audiences.settings import PROJECT_ROOT, format_time

    home = folder / "dagster_home_fork"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text((PROJECT_ROOT / "dagster_home" / "dagster.yaml").read_text())
    repository = ReconstructableRepository.for_module(
        "pipelines.definitions", "defs", str(PROJECT_ROOT)
    )
    defs = repository.get_definition()
    selection = {
        key
        for assets in defs.assets_defs_by_key.values()
        if assets.is_executable and assets.op.name in {"audience_definitions", "audience_models"}
        for key in assets.keys
    }
    job = repository.get_reconstructable_job("reevaluate_audiences").get_subset(
        asset_selection=selection
    )
    start = datetime.fromisoformat(when.replace("Z", "+00:00"))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for number in range(runs):
            at = format_time(start + timedelta(hours=number))
            run = instance.create_run_for_job(
                job.get_definition(),
                run_config={"ops": {"audience_models": {"config": {"evaluation_time": at}}}},
                asset_selection=frozenset(selection),
                job_code_origin=job.get_python_origin(),
            )
            launched = time.perf_counter()
            instance.launch_run(run.run_id, workspace=None)
            while not instance.get_run_by_id(run.run_id).is_finished:
                time.sleep(0.05)
            done = time.perf_counter()
            status = instance.get_run_by_id(run.run_id).status
            evaluation, skipped = last_evaluation(folder)
            first, last = evaluation_bounds(folder)
            logs = instance.all_logs(run.run_id)

            def when(test, logs=logs) -> float:
                return next(entry.timestamp for entry in logs if test(entry))

            started = when(
                lambda e: (
                    e.is_dagster_event
                    and "Started process for run" in (e.dagster_event.message or "")
                )
            )
            dbt_step = when(
                lambda e: (
                    e.is_dagster_event
                    and e.dagster_event.event_type_value == "STEP_START"
                    and e.step_key == "audience_models"
                )
            )
            ended = max(entry.timestamp for entry in logs)
            phases = {
                "to_process_start_s": started - logs[0].timestamp,
                "to_dbt_step_s": dbt_step - started,
                "to_first_node_s": first - dbt_step,
                "after_last_node_s": ended - last,
            }
            print(
                json.dumps(
                    {
                        "mode": "forkserver",
                        "server": "started" if number == 0 else "warm",
                        "status": status.value,
                        "wall_s": round(done - launched, 2),
                        "evaluation_s": round(evaluation, 2),
                        "ratio": round((done - launched) / evaluation, 1),
                        "parse": "skipped" if skipped else "parsed",
                        **{name: round(value, 2) for name, value in phases.items()},
                        "load_average": os.getloadavg()[0],
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
