"""Benchmark: the fixed cost of a warm Dagster evaluation run, dbt in the run's process or in a
subprocess (issue 17 item 4). One measured run per process, as a scheduled run starts.

    .venv/bin/python bench/fixed_cost.py FOLDER TIME inprocess|subprocess

FOLDER holds a warehouse that has been evaluated before (`w.duckdb`), its dbt project (`dbt`),
store (`store.sqlite`) and sinks (`sinks.yml`): README command 1 pointed there with `--duckdb`,
`--dbt-project`, `--store` and `--sinks`. TIME is a later evaluation time than the last one. The run
is the `reevaluate_audiences` job restricted to the evaluation (the definitions and the dbt
assets), as `bench/run.py`'s Dagster step runs it. Printed as one JSON line: the process's wall
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
    log = max((folder / "dbt" / "target").glob("*/dbt.log"), key=lambda p: p.stat().st_mtime)
    events = [json.loads(line) for line in log.read_text().splitlines()]

    def at(event) -> float:
        return datetime.fromisoformat(event["info"]["ts"].replace("Z", "+00:00")).timestamp()

    starts = [at(e) for e in events if e["info"]["name"] == "NodeStart"]
    ends = [at(e) for e in events if e["info"]["name"] == "NodeFinished"]
    evaluation = max(ends) - min(starts)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    skipped = any(e["info"]["name"] == "PartialParsingSkipParsing" for e in events)
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


if __name__ == "__main__":
    main()
