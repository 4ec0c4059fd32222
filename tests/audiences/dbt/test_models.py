"""Generated dbt models: readable, deterministic, and inert against hostile definitions."""

from __future__ import annotations

import json
import shutil

import duckdb
import pytest
from condition_harness import NOW, ROOT, SAMPLE_TIME, counted_compilations, insert_users

from audiences.conditions.definitions import load_definitions
from audiences.conditions.reference import evaluate_audience
from audiences.dbt.models import drift, escape_jinja, generate_models
from audiences.dbt.project import generate, prepare, run_dbt
from audiences.settings import Settings

HOSTILE_PROPERTY = 'a"; drop table users; --'
HOSTILE_TEXT = "it's {{ run_query('drop table raw.users') }} {% do x %} {# c #} */ \n -- end"


def test_escape_jinja_renders_back_to_the_original_text():
    import jinja2

    original = "{{ x }} {% y %} {# z #} {{{ w }}} { plain }"
    escaped = escape_jinja(original)
    assert "{{ x" not in escaped and "{% y" not in escaped and "{# z" not in escaped
    assert jinja2.Environment().from_string(escaped).render() == original


def test_repository_models_match_the_sample_definitions():
    import difflib

    files = generate_models(
        load_definitions(ROOT / "data" / "audiences"), ROOT / "dbt_project", "audiences"
    )
    problems = drift(files, ROOT / "dbt_project")
    # What differs, line by line: a drift seen once in CI and not alone must say what it was.
    differences = [
        "".join(difflib.unified_diff(path.read_text().splitlines(True), f.text.splitlines(True)))
        for f in files
        if (path := ROOT / "dbt_project" / f.path).exists() and path.read_text() != f.text
    ]
    assert problems == [], "\n".join(problems + differences[:3])


def test_loading_the_code_location_never_writes_models_and_names_the_drift(
    tmp_path, monkeypatch, dbt_project_copy
):
    """Issue 14 item 1: `prepare` (the code location's load) on a project whose models drifted from
    the definitions by hand (one edited, one stale, one removed) fails with "run `audiences
    generate`" and leaves every file as it was; `audiences generate` then puts them right."""
    from condition_harness import dbt_project_files

    from audiences.dbt.project import ModelsOutOfDate

    project = shutil.copytree(dbt_project_copy, tmp_path / "dbt_project")
    dynamic = project / "models" / "audiences" / "dynamic"
    (dynamic / "eu_customers.sql").write_text("select 1 as hand_edited\n")
    (dynamic / "left_over.sql").write_text("select 1\n")
    (dynamic / "churn_risk.sql").unlink()
    settings = Settings.from_env(
        {}, definitions_dir=ROOT / "data" / "audiences", dbt_project_dir=project
    )
    before = dbt_project_files(project)
    with pytest.raises(ModelsOutOfDate, match=r"run `audiences generate`") as raised:
        prepare(settings)
    assert f"stale: {dynamic / 'left_over.sql'}" in str(raised.value)
    assert "(and 2 more)" in str(raised.value)
    assert dbt_project_files(project) == before

    monkeypatch.setenv("AUDIENCES_DBT_PROJECT", str(project))
    monkeypatch.setenv("AUDIENCES_DEFINITIONS", str(ROOT / "data" / "audiences"))
    from pipelines import build_definitions

    with pytest.raises(Exception) as loading:  # Dagster names the defs file that failed
        build_definitions()
    causes = [loading.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    assert any(isinstance(cause, ModelsOutOfDate) for cause in causes), causes
    assert dbt_project_files(project) == before

    generate(settings)
    assert dbt_project_files(project) == dbt_project_files(dbt_project_copy)


def test_skipped_audiences_get_no_model_and_keep_their_rows_and_catalog_entry():
    """An audience skipped for errors in its definition: no model, listed in audience_members'
    meta as `skipped` (its rows are kept) and carried over in the catalog. A folder name that is
    no audience key never reaches the generated text (it could hold Jinja)."""
    definitions = load_definitions(ROOT / "data" / "audiences")
    del definitions["power-users"], definitions["beta-invite-candidates"]
    hostile = "x'}}{{ run_query('drop table raw.users') }}"
    files = {
        str(f.path): f.text
        for f in generate_models(
            definitions,
            ROOT / "dbt_project",
            "audiences",
            skipped=["power-users", "beta-invite-candidates", hostile],
        )
    }
    assert "models/audiences/dynamic/power_users.sql" not in files
    assert "models/audiences/dynamic/eu_customers.sql" in files
    members = files["models/marts/audience_members.sql"]
    assert (
        '"skipped": [\n                "beta-invite-candidates",\n                "power-users"\n            ]'
        in members
    )
    assert "ref('power_users')" not in members
    catalog = files["models/marts/audience_catalog.sql"]
    assert "where audience_key in ('beta-invite-candidates', 'power-users')" in catalog
    assert "'power-users', 'Power users'" not in catalog
    assert not any("drop table" in text for text in files.values())


def readability_problems(text: str) -> list[str]:
    """What keeps a generated model from reading like one a person wrote, per STYLE.md: SQL that
    is not lower-case outside comments, string literals, quoted identifiers and Jinja; tabs;
    trailing spaces; more than one blank line in a row; no final newline. (Line length is not
    held: a literal from a definition, such as an audience's name, can be as long as it likes.)"""
    import re

    problems = []
    for number, line in enumerate(text.split("\n"), start=1):
        if "\t" in line:
            problems.append(f"line {number}: a tab")
        if line != line.rstrip():
            problems.append(f"line {number}: trailing spaces")
    if "\n\n\n" in text:
        problems.append("more than one blank line in a row")
    if not text.endswith("\n"):
        problems.append("no final newline")
    code = re.sub(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", " ", text, flags=re.DOTALL)
    code = re.sub(r"--[^\n]*|/\*.*?\*/", " ", code, flags=re.DOTALL)
    code = re.sub(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", " ", code)
    shouting = sorted(set(re.findall(r"\b\w*[A-Z]\w*\b", code)))
    if shouting:
        problems.append(f"not lower-case: {', '.join(shouting)}")
    return problems


def test_the_readability_check_catches_what_it_names():
    readable = "-- A Comment\nselect 'Text', \"Column\" from {{ ref('Model') }}\n"
    assert readability_problems(readable) == []
    assert readability_problems(readable.replace("select", "SELECT")) == ["not lower-case: SELECT"]
    assert readability_problems("select\t1 \n") == ["line 1: a tab", "line 1: trailing spaces"]
    assert readability_problems("select 1\n\n\nfrom x") == [
        "more than one blank line in a row",
        "no final newline",
    ]


def test_generated_models_read_like_hand_written_ones():
    """Every model `audiences generate` writes for the sample definitions; each audience's model is
    headed by the definition it comes from."""
    definitions = load_definitions(ROOT / "data" / "audiences")
    files = generate_models(definitions, ROOT / "dbt_project", "audiences")
    texts = {str(file.path): file.text for file in files}
    for definition in definitions.values():
        text = texts[f"models/audiences/{definition.type}/{definition.model_name}.sql"]
        assert text.startswith(
            f"-- Generated by `audiences generate` from {definition.key}/audience.json."
        ), definition.key
    problems = {
        str(file.path): readability_problems(file.text)
        for file in files
        if str(file.path).endswith(".sql")
    }
    assert {path: found for path, found in problems.items() if found} == {}


def test_generated_audience_sql_is_headed_by_its_source():
    text = (ROOT / "dbt_project/models/audiences/dynamic/eu_customers.sql").read_text()
    assert text.startswith("-- Generated by `audiences generate` from eu-customers/audience.json.")
    assert "{{ ref('int_users_flattened') }}" in text
    # Attribute columns are snake_case: an analyst writes them with no quotes (issue 14 item 8).
    assert "then 's:' || address__country__text" in text
    assert '"address.country' not in text


@pytest.mark.slow
def test_hostile_definitions_build_in_dbt_and_stay_data(tmp_path):
    project = tmp_path / "dbt_project"
    shutil.copytree(ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs"))
    definitions_dir = tmp_path / "audiences"
    hostile = {
        "name": "Hostile {{ name }}",
        "type": "dynamic",
        "description": HOSTILE_TEXT,
        "segments": [
            {
                "conditions": [
                    {
                        "property": f"recipient.{HOSTILE_PROPERTY}",
                        "operator": "equal_to",
                        "argument": HOSTILE_TEXT,
                    }
                ]
            },
            {
                "conditions": [
                    {
                        "property": "recipient.{{ var('x') }}",
                        "operator": "contains",
                        "argument": "{%",
                    }
                ]
            },
        ],
    }
    follower = {
        "name": "Follower",
        "type": "dynamic",
        "segments": [
            {
                "conditions": [
                    {
                        "property": "recipient",
                        "operator": "is_not_audience_member",
                        "argument": "hostile",
                    }
                ]
            }
        ],
    }
    for key, document in {"hostile": hostile, "follower": follower}.items():
        (definitions_dir / key).mkdir(parents=True)
        (definitions_dir / key / "audience.json").write_text(json.dumps(document))
    warehouse = tmp_path / "warehouse.duckdb"
    users = [
        {"id": "match-1", HOSTILE_PROPERTY: HOSTILE_TEXT},
        {"id": "match-2", "{{ var('x') }}": "a{%b"},
        {"id": "other", HOSTILE_PROPERTY: "it's"},
    ]
    with duckdb.connect(str(warehouse)) as connection:
        insert_users(connection, users)
    settings = Settings.from_env(
        {}, duckdb_path=warehouse, definitions_dir=definitions_dir, dbt_project_dir=project
    )
    generate(settings)  # the models of these definitions (loading only checks them)
    prepare(settings)
    run_dbt(["build", "--vars", json.dumps({"evaluation_time": SAMPLE_TIME})], settings)
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        rows = connection.execute(
            "select audience_key, user_id from main.audience_members join raw.users using (user_key)"
        ).fetchall()
        assert connection.execute("select count(*) from raw.users").fetchone()[0] == 3
    members = {}
    for key, user_id in rows:
        members.setdefault(key, set()).add(user_id)
    expected_hostile = {u["id"] for u in users if evaluate_audience(hostile, u, now=NOW)}
    assert expected_hostile == {"match-1", "match-2"}
    assert members == {"hostile": expected_hostile, "follower": {"other"}}


def test_only_audiences_that_compare_with_now_are_reevaluated_for_users_in_time_windows():
    from pathlib import Path

    from audiences.conditions.definitions import parse_definition
    from audiences.dbt.models import time_dependent_audiences

    def audience(key, conditions, kind="dynamic"):
        raw = {
            "name": key,
            "type": kind,
            "segments": [{"conditions": conditions}] if conditions else [],
        }
        return parse_definition(raw, key, Path(f"{key}/audience.json"))

    recent = {
        "property": "recipient.last_seen_at",
        "operator": "is_timestamp_on_or_after",
        "argument": "3 days ago",
    }
    pro = {"property": "recipient.plan", "operator": "equal_to", "argument": "pro"}
    definitions = {
        d.key: d
        for d in [
            audience("active", [recent]),
            audience("pros", [pro]),
            audience(
                "active-pros",
                [
                    pro,
                    {
                        "property": "recipient",
                        "operator": "is_audience_member",
                        "argument": "active",
                    },
                ],
            ),
            audience(
                "over-pros",
                [{"property": "recipient", "operator": "is_audience_member", "argument": "pros"}],
            ),
            audience("vips", [], kind="static"),
            audience(
                "active-vips",
                [
                    recent,
                    {"property": "recipient", "operator": "is_audience_member", "argument": "vips"},
                ],
            ),
        ]
    }
    # An audience over a time-dependent one is time-dependent too; one over a static audience is
    # evaluated whole, not per user.
    assert time_dependent_audiences(definitions) == {"active", "active-pros"}


def _big_contains_definition(folder, items: int) -> None:
    tags = json.dumps([f"tag-{n}" for n in range(items)])
    document = {
        "name": "Big list",
        "type": "dynamic",
        "segments": [
            {
                "conditions": [
                    {"property": "recipient.tags", "operator": "contains", "argument": tags}
                ]
            }
        ],
    }
    (folder / "big").mkdir(parents=True)
    (folder / "big" / "audience.json").write_text(json.dumps(document))


def test_a_20000_item_contains_list_generates_every_item(tmp_path):
    """Issue 23: generating a `contains` list of 20,000 items took 291 s (indenting the SQL compared
    every line with every string token). Every item reaches the model, each line indented alike;
    `bench/input_sizes.py` measures that the cost grows linearly."""
    from audiences.conditions.definitions import load_definitions

    _big_contains_definition(tmp_path / "audiences", 20_000)
    files = generate_models(
        load_definitions(tmp_path / "audiences"), ROOT / "dbt_project", "audiences"
    )
    model = next(file.text for file in files if file.path.name == "big.sql")
    items = [line for line in model.splitlines() if "'s:tag-" in line]
    assert len(items) == 2 * 20_000  # the list is written twice: list/list and text/list
    assert "'s:tag-0'" in items[0] and "'s:tag-19999'" in items[-1]
    for written in (items[:20_000], items[20_000:]):
        assert len({len(line) - len(line.lstrip()) for line in written}) == 1


@pytest.mark.slow
def test_original_text_quoting_and_epoch_times_agree_with_the_reference_in_dbt(tmp_path):
    """Issue 13 through the real dbt build: names and values holding quotes, backslashes, Jinja,
    LIKE wildcards and newlines, and Unix-second time arguments, give the reference's members."""
    project = tmp_path / "dbt_project"
    shutil.copytree(ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs"))
    definitions_dir = tmp_path / "audiences"
    odd = "it's\\{{ %_\n"
    audiences = {
        "quoted": [{"property": 'recipient."quoted"', "operator": "equal_to", "argument": '"q"'}],
        "not-quoted": [
            {"property": 'recipient."quoted"', "operator": "not_equal_to", "argument": '"q"'}
        ],
        "backslash": [
            {"property": f"recipient.{odd}", "operator": "equal_to", "argument": '"a\\\\b"'}
        ],
        "wildcards": [{"property": f"recipient.{odd}", "operator": "contains", "argument": "a%_"}],
        "listed": [
            {
                "property": "recipient.tags",
                "operator": "contains",
                "argument": '["\\"q\\"", "{{ x }}"]',
            }
        ],
        "newline": [{"property": f"recipient.{odd}", "operator": "contains", "argument": "1\n2"}],
        "epoch": [
            {
                "property": "recipient.seen",
                "operator": "is_timestamp_before",
                "argument": "1788825601",
            }
        ],
        "epoch-between": [
            {
                "property": "recipient.seen",
                "operator": "is_timestamp_between",
                "argument": [1788825600, "2026-09-08T00:00:00.5Z"],
            }
        ],
    }
    for key, conditions in audiences.items():
        (definitions_dir / key).mkdir(parents=True)
        (definitions_dir / key / "audience.json").write_text(
            json.dumps({"name": key, "type": "dynamic", "segments": [{"conditions": conditions}]})
        )
    users = [
        {"id": "q-quoted", '"quoted"': '"q"', odd: "a\\b", "tags": ['"q"'], "seen": 1788825600},
        {
            "id": "q-bare",
            '"quoted"': "q",
            odd: '"a\\\\b"',
            "tags": ["q", "{{ x }}"],
            "seen": "2026-09-08T00:00:01Z",
        },
        {"id": "wild", '"quoted"': "'q'", odd: "xa%_y 1\n2", "tags": ["x"], "seen": 1788825600.25},
        {"id": "tame", odd: "abc 12", "seen": "2026-09-08T00:00:00.6Z"},
    ]
    warehouse = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(warehouse)) as connection:
        insert_users(connection, users)
    settings = Settings.from_env(
        {}, duckdb_path=warehouse, definitions_dir=definitions_dir, dbt_project_dir=project
    )
    generate(settings)  # the models of these definitions (loading only checks them)
    prepare(settings)
    run_dbt(["build", "--vars", json.dumps({"evaluation_time": SAMPLE_TIME})], settings)
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        rows = connection.execute(
            "select audience_key, user_id from main.audience_members join raw.users using (user_key)"
        ).fetchall()
    members = {key: set() for key in audiences}
    for key, user_id in rows:
        members[key].add(user_id)
    expected = {
        key: {
            u["id"]
            for u in users
            if evaluate_audience({"segments": [{"conditions": conditions}]}, u, now=NOW)
        }
        for key, conditions in audiences.items()
    }
    assert expected["quoted"] == {"q-quoted", "q-bare"} and expected["epoch"] == {
        "q-quoted",
        "wild",
        "tame",
    }
    assert members == expected


def _bench_module(name: str):
    import importlib
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_audience_members_is_evaluated_in_statements_of_bounded_size(tmp_path, monkeypatch):
    """Issue 25: no statement of audience_members grows with the number of audiences: each batch
    macro holds at most MEMBERS_BATCH_SIZE audiences, and the batches cover every audience once."""
    from audiences.dbt import models

    audience_count = _bench_module("audience_count")
    audience_count.write_definitions(tmp_path / "audiences", 230)
    definitions = load_definitions(tmp_path / "audiences")
    files = {str(f.path): f.text for f in generate_models(definitions, ROOT / "dbt_project", "x")}
    batches = sorted(p for p in files if p.startswith("macros/generated/audience_members_batch_"))
    assert len(batches) == 3
    # every audience has one branch that evaluates it whole, from its model
    per_batch = [
        [
            key
            for key in definitions
            if f"select '{key}' as audience_key, user_key, tenant from" in files[path]
        ]
        for path in batches
    ]
    assert all(len(keys) <= models.MEMBERS_BATCH_SIZE for keys in per_batch)
    keys = [key for batch in per_batch for key in batch]
    assert sorted(keys) == sorted(definitions)
    assert "where false" in files["models/marts/audience_members.sql"]


@pytest.mark.slow
def test_audience_members_in_many_batches_equals_every_view_cold_and_incrementally(
    tmp_path, monkeypatch
):
    """Evaluated in batches of 7 audiences (60 audiences, references within each copy), a cold
    build and an incremental one after 1% of users changed and "now" moved give exactly the
    members of every audience view evaluated whole."""
    from datetime import timedelta

    from audiences.dbt import models
    from audiences.warehouse.evaluation import set_evaluation_clock

    audience_count = _bench_module("audience_count")
    synthetic = _bench_module("synthetic")
    monkeypatch.setattr(models, "MEMBERS_BATCH_SIZE", 7)
    project = tmp_path / "dbt_project"
    shutil.copytree(ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs"))
    shutil.rmtree(project / "models" / "audiences" / "custom")
    audience_count.write_definitions(tmp_path / "audiences", 60)
    warehouse = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(warehouse)) as connection:
        synthetic.generate_users(connection, 2_000)
        set_evaluation_clock(connection, NOW)
    settings = Settings.from_env(
        {}, duckdb_path=warehouse, definitions_dir=tmp_path / "audiences", dbt_project_dir=project
    )
    generate(settings)
    prepare(settings)
    assert len(list((project / "macros" / "generated").glob("audience_members_batch_*.sql"))) == 9

    def compare() -> int:
        with duckdb.connect(str(warehouse), read_only=True) as connection:
            views = connection.execute(
                "select audience_key, model_name from main.audience_catalog"
            ).fetchall()
            union = " union all ".join(
                f"select '{key}' as audience_key, user_key, tenant from audiences.{name}"
                for key, name in views
            )
            difference = connection.execute(
                f"""
                select count(*) from (
                    (select audience_key, user_key, tenant from main.audience_members
                     except all ({union}))
                    union all
                    (({union}) except all
                     select audience_key, user_key, tenant from main.audience_members)
                )
                """
            ).fetchone()[0]
            assert difference == 0
            return connection.execute("select count(*) from main.audience_members").fetchone()[0]

    run_dbt(["build"], settings)
    assert compare() > 1_000
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute(synthetic.touch_users_sql(1))
        set_evaluation_clock(connection, NOW + timedelta(minutes=15))
    run_dbt(["build"], settings)
    compare()
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        # the second build re-evaluated the changed users (the log keeps the cold build's
        # `(null, null)` too, until a membership diff reads it)
        per_user = connection.execute(
            "select count(*) from main.audience_members__reevaluated "
            "where audience_key is null and user_key is not null"
        ).fetchone()[0]
    assert per_user > 0


def test_the_engine_notes_in_generated_files_are_jinja_comments():
    """Issue 14 item 8: how the engine works (watermarks, batches, why a query is shaped so) is
    told in Jinja comments, which dbt leaves out of the compiled SQL. The SQL comments left are
    short labels an analyst reads in the compiled query: the file's source, the audience's name
    and description, a segment, a condition, a property, a branch of a union."""
    import re

    files = generate_models(
        load_definitions(ROOT / "data" / "audiences"), ROOT / "dbt_project", "audiences"
    )
    for file in files:
        if not str(file.path).endswith(".sql"):
            continue
        code = re.sub(r"\{#.*?#\}", "", file.text, flags=re.DOTALL)
        block: list[str] = []
        for line in code.split("\n"):
            stripped = line.strip()
            if stripped.startswith("--") and not stripped.startswith("-- depends_on:"):
                block.append(stripped)
                assert len(block) <= 3, f"{file.path}: a note in SQL comments: {block}"
            else:
                block = []


def test_a_run_with_nothing_changed_compiles_no_definition(tmp_path, monkeypatch, dbt_project_copy):
    """Issue 17, the fixed cost of a run: `audiences run` generates the models and the code
    location's load checks them, each compiling every definition (seconds with many audiences).
    When the definitions, the generator and the project's files are those the models were last
    generated or checked from, neither compiles anything; a change to any of them does."""
    import audiences.dbt.project as project_module
    from audiences.dbt.project import ModelsOutOfDate, check_generated

    project = shutil.copytree(dbt_project_copy, tmp_path / "dbt_project")
    definitions = shutil.copytree(ROOT / "data" / "audiences", tmp_path / "audiences")
    settings = Settings.from_env({}, dbt_project_dir=project, definitions_dir=definitions)
    generate(settings)
    compiled = []
    real = project_module.generate_models
    monkeypatch.setattr(
        project_module,
        "generate_models",
        lambda *args, **kwargs: compiled.append(1) or real(*args, **kwargs),
    )
    assert generate(settings) == []
    check_generated(settings)
    assert compiled == []

    # A definition changed: generate compiles and writes its model again.
    eu = definitions / "eu-customers" / "audience.json"
    document = json.loads(eu.read_text())
    document["segments"][0]["conditions"][0]["argument"] = '["DE"]'
    eu.write_text(json.dumps(document))
    assert project / "models/audiences/dynamic/eu_customers.sql" in generate(settings)
    assert compiled == [1]
    # A generated model edited by hand: the check compiles and names the drift.
    (project / "models/audiences/dynamic/eu_customers.sql").write_text("select 1 as edited\n")
    with pytest.raises(ModelsOutOfDate):
        check_generated(settings)
    assert compiled == [1, 1]


def test_loading_compiles_only_the_definitions_that_did_not_compile(
    tmp_path, monkeypatch, dbt_project_copy
):
    """Issue 25: loading the code location read every definition and compiled every condition
    again (5.6 CPU s at 2,000 audiences), although `generate` had just compiled the same files with
    the same compiler. When the models were generated from these very files, loading compiles
    only the definitions that could not be used then, to name their problems; the set it returns
    is the one a full check returns."""
    from audiences.conditions.definitions import _parse_text, load_definition_set
    from audiences.dbt.project import (
        COMPILE_CACHE_FILE,
        GENERATED_STAMP_FILE,
        project_definitions,
    )

    project = shutil.copytree(dbt_project_copy, tmp_path / "dbt_project")
    definitions = shutil.copytree(ROOT / "data" / "audiences", tmp_path / "audiences")
    broken = definitions / "seats-misspelled" / "audience.json"
    broken.parent.mkdir()
    broken.write_text(
        json.dumps(
            {
                "name": "Seats",
                "type": "dynamic",
                "segments": [
                    {
                        "conditions": [
                            {
                                "property": "recipient.seats",
                                "operator": "greater_than",
                                "argument": "many",
                            }
                        ]
                    }
                ],
            }
        )
    )
    settings = Settings.from_env({}, dbt_project_dir=project, definitions_dir=definitions)
    generate(settings)
    compiled = counted_compilations(monkeypatch)
    loaded = project_definitions(settings)
    assert compiled == ["$.segments[0].conditions[0]"]  # the broken one's only condition
    _parse_text.cache_clear()
    checked = load_definition_set(definitions)
    assert len(compiled) > 20  # a full load compiles every condition
    assert loaded == checked
    assert "seats-misspelled" in loaded.skipped
    assert "not a number" in str(loaded.skipped["seats-misspelled"][0])

    # Without the stamp, the compile cache `generate` kept still knows the files it compiled:
    # a file edited since is compiled, with the broken one, and nothing else.
    (project / "target" / GENERATED_STAMP_FILE).unlink()
    eu = definitions / "eu-customers" / "audience.json"
    eu.write_text(eu.read_text().replace('"free"', '"starter"'))
    compiled.clear()
    _parse_text.cache_clear()
    changed = project_definitions(settings)
    assert changed.keys == checked.keys and changed.skipped == checked.skipped
    assert len(compiled) == 1 + sum(
        len(segment) for segment in changed.definitions["eu-customers"].segments
    )

    # Files that are not those the models were generated from, nor in the cache, are compiled
    # in full.
    (project / "target" / COMPILE_CACHE_FILE).unlink()
    compiled.clear()
    _parse_text.cache_clear()
    assert project_definitions(settings) == changed
    assert len(compiled) > 20


def test_a_definition_change_compiles_that_definition_only(tmp_path, monkeypatch, dbt_project_copy):
    """Issue 25: `generate` compiled every definition again when one changed (8.9 CPU s of the
    one-definition change at 2,000 audiences). Compilations are kept by content under the dbt
    project's `target/`, across processes: editing one definition compiles it and the audiences
    that inline its conditions, and a change to the generator, SQLGlot or a definition they read
    is part of what each compilation is kept under. What is written is what a generation without
    the cache writes."""
    import audiences.dbt.models as models_module
    from audiences.conditions.definitions import _parse_text
    from audiences.dbt.project import COMPILE_CACHE_FILE, project_definitions

    project = shutil.copytree(dbt_project_copy, tmp_path / "dbt_project")
    definitions = shutil.copytree(ROOT / "data" / "audiences", tmp_path / "audiences")
    settings = Settings.from_env({}, dbt_project_dir=project, definitions_dir=definitions)
    generate(settings)
    assert (project / "target" / COMPILE_CACHE_FILE).exists()
    compiled: list[str] = []
    real = models_module._compile_audience

    def counting(definition, *args, **kwargs):
        compiled.append(definition.key)
        return real(definition, *args, **kwargs)

    monkeypatch.setattr(models_module, "_compile_audience", counting)

    def edit(key: str, old: str, new: str) -> None:
        path = definitions / key / "audience.json"
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
        _parse_text.cache_clear()  # as in a new process: only the files on disk are kept

    def matches_a_generation_without_the_cache() -> None:
        found = project_definitions(settings)
        files = generate_models(
            found.definitions,
            project,
            definitions.name,
            found.skipped,
            models_module.CompileCache(),
        )
        assert drift(files, project) == []

    # An audience nobody reads: its model's compilation only.
    edit("eu-customers", '"free"', '"starter"')
    written = generate(settings)
    assert compiled == ["eu-customers"]
    assert project / "models/audiences/dynamic/eu_customers.sql" in written
    assert "'starter'" in (project / "models/audiences/dynamic/eu_customers.sql").read_text()
    compiled.clear()
    matches_a_generation_without_the_cache()

    # An audience another one inlines (beta-invite-candidates reads power-users): both compile,
    # and the reader's per-user branch in audience_members follows the change.
    compiled.clear()
    power = json.loads((definitions / "power-users" / "audience.json").read_text())
    condition = power["segments"][0]["conditions"][0]
    edit(
        "power-users",
        json.dumps(condition["argument"]),
        json.dumps(str(condition["argument"]) + "0"),
    )
    generate(settings)
    assert sorted(compiled) == ["beta-invite-candidates", "power-users"]
    compiled.clear()
    matches_a_generation_without_the_cache()

    # Another generator (its source, SQLGlot's version or the dialect): everything compiles again.
    compiled.clear()
    monkeypatch.setattr(models_module, "generator_fingerprint", lambda: "another generator")
    edit("eu-customers", '"starter"', '"free"')
    generate(settings)
    dynamic = [
        key
        for key, definition in project_definitions(settings).definitions.items()
        if definition.type == "dynamic"
    ]
    assert set(compiled) >= set(dynamic)
