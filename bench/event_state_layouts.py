"""One event-state update's table work (find the kept rows, delete, insert, checkpoint) on a copy
of a database `bench/events.py` left behind, in the present layout (a row per user and condition)
or one row per user (a list of structs), for the rows the last 1% of its events rewrite.

    PYTHONPATH=. .venv/bin/python bench/event_state_layouts.py /tmp/bench-events-XXXX/warehouse.duckdb pair

MODE: `pair` (as now), `pair-no-vacuum` (DuckDB's vacuum off), `user` (one row per user). CPU
seconds of this process; prints, writes nothing but the copy, which it removes.
"""

import os
import resource
import shutil
import sys
import time
from datetime import timedelta

import duckdb
import events as b
from sqlglot import exp

from audiences.conditions.compiler import event_state_sql

db, mode = sys.argv[1], sys.argv[2]
copy = f"{db}.{mode}.copy"
shutil.copy(db, copy)
c = duckdb.connect(copy)
c.execute("set TimeZone='UTC'; set threads=2; set memory_limit='3GB'")
if mode == "pair-no-vacuum":
    c.execute("set max_vacuum_tasks=0")
defs = b.audiences(20)
now = b.NOW + timedelta(minutes=30) + timedelta(hours=1) + timedelta(days=1)
total = c.execute("select max(event_seq) from raw.events").fetchone()[0]
after = int(total - total * 0.01)
rows = event_state_sql(
    b.state_conditions(defs),
    b.context(now),
    exp.Literal.number(total),
    previous=exp.to_table("bench_state_rows"),
    markers=lambda k: (exp.Literal.number(after), exp.true()),
)
c.execute(
    "create table pairs as select distinct state_key, user_number from ("
    + rows
    + ") where user_number <> -1"
)
c.execute("create table u as select distinct user_number from pairs")
if mode == "user":
    c.execute(
        "create table nested as select user_number, min(next_change) as next_change, max(changed_at) as changed_at, list({'k': state_key, 't': times, 'n': next_change, 'h': holds, 'c': changed_at}) as s from bench_state_rows where user_number <> -1 group by user_number order by user_number"
    )
c.execute("checkpoint")
print(
    mode,
    "pairs, users, state rows",
    c.execute(
        "select (select count(*) from pairs), (select count(*) from u), (select count(*) from bench_state_rows)"
    ).fetchone(),
    "load",
    os.getloadavg()[0],
)


def cpu():
    x = resource.getrusage(resource.RUSAGE_SELF)
    return x.ru_utime + x.ru_stime


tot = 0.0


def t(label, sql):
    global tot
    s, cp = time.perf_counter(), cpu()
    c.execute(sql)
    d = cpu() - cp
    tot += d
    print(f"  {label}: wall {time.perf_counter() - s:.3f} cpu {d:.3f}", flush=True)


if mode.startswith("pair"):
    t(
        "lookup",
        "create or replace temp table lk as select k.* from bench_state_rows k join pairs p on p.state_key=k.state_key and p.user_number=k.user_number",
    )
    t(
        "delete",
        "delete from bench_state_rows as T using lk where lk.state_key=T.state_key and lk.user_number=T.user_number",
    )
    t("insert", "insert into bench_state_rows select * from lk")
else:
    t(
        "lookup",
        "create or replace temp table lkn as select w.* from nested w join u using (user_number)",
    )
    t("delete", "delete from nested as T using u where T.user_number = u.user_number")
    t("insert", "insert into nested select * from lkn")
t("checkpoint", "checkpoint")
print("  total CPU", round(tot, 3))
c.close()
os.remove(copy)
