"""Benchmark: the cost of large inputs grows linearly with their size.

    .venv/bin/python bench/input_sizes.py

Issue 23 found inputs that bought minutes of CPU: `audiences generate` of a `contains` list of
20,000 items took 291 s (50,000 never finished), and a one-row CSV of 4,000 columns took 89 s to
upload (8,000 columns over 300 s). Both were quadratic. Measured here, in one run:

1. **Generation.** CPU seconds of `generate_models` for one audience whose `contains` list has
   1k, 8k, 20k and 50k items, and the ratio of each to the 1k cost per item.
2. **Wide CSV upload.** CPU seconds of `upload_csv` of a one-row file with 10, 1k, 4k and 8k
   columns into a fresh SQLite store, and the same ratio per column.

Linear means the per-item ratios stay near 1 (a quadratic cost makes the 8x and 20x sizes cost 8x
and 20x more per item). Results go to `bench/input-sizes-results.md` and `.json`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from audiences.conditions.definitions import load_definitions  # noqa: E402
from audiences.dbt.models import generate_models  # noqa: E402
from audiences.static.uploads import upload_csv  # noqa: E402
from audiences.store.database import MembershipStore  # noqa: E402

LIST_SIZES = (1_000, 8_000, 20_000, 50_000)
COLUMN_COUNTS = (10, 1_000, 4_000, 8_000)


def cpu_seconds(work) -> float:
    started = time.process_time()
    work()
    return time.process_time() - started


def bench_generation(folder: Path) -> list[dict]:
    results = []
    for items in LIST_SIZES:
        definitions_dir = folder / f"list-{items}"
        (definitions_dir / "big").mkdir(parents=True)
        argument = json.dumps([f"tag-{n}" for n in range(items)])
        (definitions_dir / "big" / "audience.json").write_text(
            json.dumps(
                {
                    "name": "Big list",
                    "type": "dynamic",
                    "segments": [
                        {
                            "conditions": [
                                {
                                    "property": "recipient.tags",
                                    "operator": "contains",
                                    "argument": argument,
                                }
                            ]
                        }
                    ],
                }
            )
        )
        definitions = load_definitions(definitions_dir)
        seconds = cpu_seconds(
            lambda definitions=definitions: generate_models(
                definitions, ROOT / "dbt_project", "audiences"
            )
        )
        results.append({"items": items, "cpu_seconds": round(seconds, 3)})
        print("generate", results[-1], flush=True)
    return results


def bench_upload(folder: Path) -> list[dict]:
    results = []
    for columns in COLUMN_COUNTS:
        path = folder / f"wide-{columns}.csv"
        path.write_text(
            "id," + ",".join(f"c{i}" for i in range(columns)) + "\n"
            "u1," + ",".join(f"v{i}" for i in range(columns)) + "\n"
        )
        store = MembershipStore(f"sqlite:///{folder}/store-{columns}.sqlite").create()
        seconds = cpu_seconds(
            lambda store=store, path=path: upload_csv(store, "vips", path, {"vips": "static"})
        )
        store.dispose()
        results.append({"columns": columns, "cpu_seconds": round(seconds, 3)})
        print("upload", results[-1], flush=True)
    return results


def per_unit_ratios(rows: list[dict], unit: str) -> None:
    base = rows[0]["cpu_seconds"] / rows[0][unit]
    for row in rows:
        row["per_unit_vs_smallest"] = (
            round(row["cpu_seconds"] / row[unit] / base, 2) if base else None
        )


def main() -> None:
    results = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        results["generate"] = bench_generation(folder)
        results["upload"] = bench_upload(folder)
    per_unit_ratios(results["generate"], "items")
    per_unit_ratios(results["upload"][1:], "columns")  # 10 columns is all fixed cost
    (ROOT / "bench" / "input-sizes-results.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Input sizes: generation and wide uploads",
        "",
        f"Produced by `.venv/bin/python bench/input_sizes.py` on {results['started']} ({results['cores']} cores); "
        "CPU seconds of one run on a shared machine. Per-unit cost relative to the smallest size: near 1 is "
        "linear. Details: `bench/input_sizes.py`.",
        "",
        "| `contains` items | generate CPU s | per item vs 1k |",
        "|---:|---:|---:|",
        *[
            f"| {r['items']:,} | {r['cpu_seconds']} | {r['per_unit_vs_smallest']} |"
            for r in results["generate"]
        ],
        "",
        "| CSV columns (one row) | upload CPU s | per column vs 1k |",
        "|---:|---:|---:|",
        *[
            f"| {r['columns']:,} | {r['cpu_seconds']} | {r.get('per_unit_vs_smallest', '—')} |"
            for r in results["upload"]
        ],
    ]
    (ROOT / "bench" / "input-sizes-results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
