"""Audience definitions in the Knock CLI layout: loading, and validation naming file and JSON path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from condition_harness import ROOT

from audiences.conditions.definitions import (
    DefinitionError,
    evaluation_order,
    load_definition_file,
    load_definition_set,
    load_definitions,
    validate_definitions,
)


def write(folder: Path, key: str, document) -> Path:
    path = folder / key / "audience.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        document if isinstance(document, str) else json.dumps(document), encoding="utf-8"
    )
    return path


def dynamic(*conditions, name="A") -> dict:
    return {
        "name": name,
        "type": "dynamic",
        "description": None,
        "segments": [{"conditions": list(conditions)}],
    }


def problems_of(folder: Path) -> list[str]:
    with pytest.raises(DefinitionError) as error:
        load_definitions(folder)
    return [str(problem) for problem in error.value.problems]


def test_sample_definitions_load_and_validate():
    definitions = load_definitions(ROOT / "data" / "audiences")
    assert len(definitions) >= 10
    assert validate_definitions(definitions) == []
    operators = {c.operator for d in definitions.values() for s in d.segments for c in s}
    assert {
        "equal_to",
        "is_between",
        "contains_all",
        "not_exists",
        "is_timestamp_between",
        "is_audience_member",
        "is_in_random_cohort",
    } <= operators


def test_knock_cli_document_loads_unchanged(tmp_path):
    write(
        tmp_path,
        "premium-users",
        {
            "name": "Premium users",
            "type": "dynamic",
            "description": "…",
            "segments": [
                {
                    "conditions": [
                        {
                            "property": "recipient.plan",
                            "operator": "equal_to",
                            "argument": "premium",
                        }
                    ]
                }
            ],
        },
    )
    definition = load_definitions(tmp_path)["premium-users"]
    assert (definition.type, definition.model_name) == ("dynamic", "premium_users")
    assert len(definition.version) == 12


def test_bad_key_is_named_with_its_file(tmp_path):
    path = write(
        tmp_path, "Premium Users", dynamic({"property": "recipient.plan", "operator": "exists"})
    )
    assert problems_of(tmp_path) == [
        f"{path}: $: bad audience key 'Premium Users': use lower-case letters, digits, '-' and '_'"
    ]


def test_unknown_operator_names_the_json_path(tmp_path):
    path = write(
        tmp_path,
        "a",
        dynamic(
            {"property": "recipient.plan", "operator": "exists"},
            {"property": "recipient.plan", "operator": "is_like", "argument": "x"},
        ),
    )
    [problem] = problems_of(tmp_path)
    assert problem.startswith(
        f"{path}: $.segments[0].conditions[1].operator: unknown operator 'is_like'"
    )


def test_a_misspelt_operator_gets_the_nearest_known_one(tmp_path):
    path = write(
        tmp_path,
        "a",
        dynamic({"property": "recipient.plan", "operator": "equals", "argument": "pro"}),
    )
    [problem] = problems_of(tmp_path)
    assert problem.startswith(
        f"{path}: $.segments[0].conditions[0].operator: unknown operator 'equals' "
        "(did you mean 'equal_to'?); known operators: contains,"
    )


def test_bad_argument_and_short_relative_time_are_rejected(tmp_path):
    write(
        tmp_path,
        "a",
        dynamic({"property": "recipient.seats", "operator": "greater_than", "argument": "many"}),
    )
    write(
        tmp_path,
        "b",
        dynamic(
            {
                "property": "recipient.seen_at",
                "operator": "is_timestamp_on_or_after",
                "argument": "10 minutes ago",
            }
        ),
    )
    problems = problems_of(tmp_path)
    assert any(
        "a/audience.json: $.segments[0].conditions[0].argument:" in p and "not a number" in p
        for p in problems
    )
    assert any(
        "b/audience.json: $.segments[0].conditions[0].argument:" in p and "at least 15 minutes" in p
        for p in problems
    )


def test_invalid_json_and_missing_fields_are_reported_together(tmp_path):
    write(tmp_path, "broken", "{not json")
    write(tmp_path, "nameless", {"type": "dynamic", "segments": []})
    write(tmp_path, "typeless", {"name": "T", "type": "sometimes"})
    problems = "\n".join(problems_of(tmp_path))
    assert "broken/audience.json: $: not valid JSON" in problems
    assert "nameless/audience.json: $.name:" in problems
    assert "typeless/audience.json: $.type:" in problems


def member_of(key: str) -> dict:
    return {"property": "recipient", "operator": "is_audience_member", "argument": key}


def test_membership_cycle_is_rejected_with_the_cycle_named(tmp_path):
    write(tmp_path, "a", dynamic(member_of("b")))
    write(tmp_path, "b", dynamic(member_of("c")))
    write(tmp_path, "c", dynamic(member_of("a")))
    write(tmp_path, "self", dynamic(member_of("self")))
    problems = [str(p) for p in validate_definitions(load_definitions(tmp_path))]
    assert any("audience membership cycle: a -> b -> c -> a" in p for p in problems)
    assert any("audience membership cycle: self -> self" in p for p in problems)


def test_unknown_audience_reference_is_rejected_unless_written_in_sql(tmp_path):
    write(tmp_path, "a", dynamic(member_of("elsewhere")))
    definitions = load_definitions(tmp_path)
    [problem] = validate_definitions(definitions)
    assert "$.segments[0].conditions[0].argument: unknown audience 'elsewhere'" in str(problem)
    assert validate_definitions(definitions, other_audiences=["elsewhere"]) == []


def test_type_change_of_an_existing_audience_is_rejected(tmp_path):
    path = write(tmp_path, "vips", dynamic({"property": "recipient.plan", "operator": "exists"}))
    [problem] = validate_definitions(load_definitions(tmp_path), existing_types={"vips": "static"})
    assert str(problem).startswith(
        f"{path}: $.type: audience 'vips' is static; types cannot be changed"
    )


def test_static_audience_cannot_have_segments(tmp_path):
    write(tmp_path, "s", {"name": "S", "type": "static", "segments": [{"conditions": []}]})
    assert (
        "s/audience.json: $.segments: a static audience has no segments" in problems_of(tmp_path)[0]
    )


def test_keys_that_collide_as_model_names_are_rejected(tmp_path):
    write(tmp_path, "a-b", dynamic({"property": "recipient.x", "operator": "exists"}))
    write(tmp_path, "a_b", dynamic({"property": "recipient.x", "operator": "exists"}))
    assert "map to the same model name 'a_b'" in problems_of(tmp_path)[0]


def test_evaluation_order_puts_referenced_audiences_first(tmp_path):
    write(tmp_path, "a", dynamic(member_of("c")))
    write(tmp_path, "b", dynamic({"property": "recipient.x", "operator": "exists"}))
    write(tmp_path, "c", dynamic(member_of("b")))
    assert evaluation_order(load_definitions(tmp_path)) == ["b", "c", "a"]


def test_a_definition_set_skips_broken_definitions_and_every_audience_that_refers_to_them(tmp_path):
    good = dynamic({"property": "recipient.plan", "operator": "exists"})
    write(tmp_path, "fine", good)
    write(tmp_path, "reads-fine", dynamic(member_of("fine")))
    not_json = write(tmp_path, "not-json", "{not json")
    unknown_operator = write(
        tmp_path,
        "unknown-operator",
        dynamic({"property": "recipient.plan", "operator": "equals", "argument": "pro"}),
    )
    reads_broken = write(
        tmp_path,
        "reads-broken",
        dynamic(good["segments"][0]["conditions"][0], member_of("unknown-operator")),
    )
    write(
        tmp_path,
        "reads-reader",
        dynamic({**member_of("reads-broken"), "operator": "is_not_audience_member"}),
    )
    write(tmp_path, "reads-nothing", dynamic(member_of("no-such-audience")))
    write(tmp_path, "cycle-a", dynamic(member_of("cycle-b")))
    write(tmp_path, "cycle-b", dynamic(member_of("cycle-a")))
    found = load_definition_set(tmp_path)
    assert set(found.definitions) == {"fine", "reads-fine"}
    assert set(found.skipped) == {
        "not-json",
        "unknown-operator",
        "reads-broken",
        "reads-reader",
        "reads-nothing",
        "cycle-a",
        "cycle-b",
    }
    assert str(found.skipped["not-json"][0]).startswith(f"{not_json}: $: not valid JSON: ")
    assert str(found.skipped["unknown-operator"][0]).startswith(
        f"{unknown_operator}: $.segments[0].conditions[0].operator: unknown operator 'equals'"
    )
    assert [str(p) for p in found.skipped["reads-broken"]] == [
        f"{reads_broken}: $.segments[0].conditions[1].argument: refers to audience 'unknown-operator', which is "
        "skipped (its definition has errors)"
    ]
    assert "refers to audience 'reads-broken'" in str(
        found.skipped["reads-reader"][0]
    )  # transitively
    assert "unknown audience 'no-such-audience'" in str(found.skipped["reads-nothing"][0])
    assert "cycle" in str(found.skipped["cycle-b"][0])
    # What `validate` lists: each problem once, none for the audiences that only refer to one.
    assert len(found.problems) == 4 and not any("refers to" in str(p) for p in found.problems)
    with pytest.raises(DefinitionError, match="unknown operator 'equals'"):
        found.require("unknown-operator")
    assert found.require("reads-fine").key == "reads-fine"


def test_a_file_that_is_not_utf8_names_its_line_and_the_expected_encoding(tmp_path):
    path = tmp_path / "cafe" / "audience.json"
    path.parent.mkdir()
    path.write_bytes(
        '{\n  "type": "dynamic",\n  "name": "Caf\u00e9 regulars",\n  "segments": []\n}\n'.encode(
            "cp1252"
        )
    )
    with pytest.raises(DefinitionError) as error:
        load_definition_file(path)
    assert str(error.value) == (
        f"{path}: $: line 3, column 15: byte 0xe9 is not UTF-8; audience definitions must be "
        "saved as UTF-8 (was it saved as Latin-1 or Windows-1252?)"
    )
    found = load_definition_set(tmp_path)  # a broken definition like any other: skipped, named
    assert found.definitions == {} and str(found.skipped["cafe"][0]) == str(error.value)


def test_utf16_is_named_and_a_utf8_byte_order_mark_is_accepted(tmp_path):
    document = json.dumps(
        dynamic({"property": "recipient.plan", "operator": "exists"}, name="Café")
    )
    path = tmp_path / "a" / "audience.json"
    path.parent.mkdir()
    path.write_text(document, encoding="utf-16")
    with pytest.raises(DefinitionError, match=r"\$: the file is UTF-16 .* must be saved as UTF-8"):
        load_definition_file(path)
    path.write_text(document, encoding="utf-8-sig")
    assert load_definition_file(path).name == "Café"


def test_validate_lists_a_broken_file_and_another_files_unknown_reference_together(
    tmp_path, capsys
):
    from audiences import cli

    broken = write(tmp_path, "broken", "{not json")
    reader = write(tmp_path, "reader", dynamic(member_of("nowhere")))
    assert (
        cli.main(
            ["--definitions", str(tmp_path), "--duckdb", str(tmp_path / "none.duckdb"), "validate"]
        )
        == 1
    )
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"error: {broken}: $: not valid JSON")
    assert lines[1] == f"{reader}: $.segments[0].conditions[0].argument: unknown audience 'nowhere'"


def test_epoch_seconds_are_a_time_and_out_of_range_ones_are_named(tmp_path):
    """A number argument of a timestamp operator is Unix seconds (docs/conditions.md)."""
    write(
        tmp_path,
        "a",
        dynamic(
            {
                "property": "recipient.t",
                "operator": "is_timestamp_before",
                "argument": "1788825601",
            },
            {
                "property": "recipient.t",
                "operator": "is_timestamp_between",
                "argument": '[1788825600.5, "2026-12-31"]',
            },
        ),
    )
    assert set(load_definitions(tmp_path)) == {"a"}
    path = write(
        tmp_path,
        "b",
        dynamic(
            {"property": "recipient.t", "operator": "is_timestamp_on_or_after", "argument": "1e20"},
            {"property": "recipient.t", "operator": "is_timestamp_between", "argument": [0, -1e15]},
        ),
    )
    first, second = problems_of(tmp_path)
    assert first.startswith(f"{path}: $.segments[0].conditions[0].argument: 1e+20 ")
    assert "years 1..9999" in first
    assert second.startswith(
        f"{path}: $.segments[0].conditions[1].argument[1]: -1000000000000000.0 "
    )


def test_a_cycle_at_the_end_of_a_long_chain_is_named_not_a_recursion_error(tmp_path):
    """Issue 25: with thousands of audiences, references may chain deeper than Python's recursion
    limit; validation still names the cycle, and the rest is ordered."""
    length = 1_500
    for n in range(length):
        write(tmp_path, f"a{n:04d}", dynamic(member_of(f"a{n + 1:04d}")))
    write(tmp_path, f"a{length:04d}", dynamic(member_of(f"a{length - 2:04d}")))
    write(tmp_path, "fine", dynamic({"property": "recipient.x", "operator": "exists"}))
    found = load_definition_set(tmp_path)
    cycle = f"audience membership cycle: a{length - 2:04d} -> a{length - 1:04d} -> a{length:04d} -> a{length - 2:04d}"
    assert any(cycle in str(problem) for problem in found.problems)
    assert set(found.definitions) == {"fine"} and len(found.skipped) == length + 1
    chain = {f"b{n:04d}": dynamic(member_of(f"b{n + 1:04d}")) for n in range(length)}
    chain[f"b{length:04d}"] = dynamic({"property": "recipient.x", "operator": "exists"})
    for key, document in chain.items():
        write(tmp_path / "chain", key, document)
    order = evaluation_order(load_definitions(tmp_path / "chain"))
    assert order == [f"b{n:04d}" for n in range(length, -1, -1)]


def test_an_audience_that_refers_to_a_skipped_one_names_those_skipped_a_step_before(tmp_path):
    """The audiences skipped for their references, a step of references at a time: each names the
    audiences skipped before its step (`direct` refers to `broken` and to `middle`, skipped in the
    same step: only `broken` is named), and those referring to nothing skipped are kept."""
    write(tmp_path, "broken", dynamic({"property": "recipient.x", "operator": "equals"}))
    write(tmp_path, "middle", dynamic(member_of("broken")))
    write(tmp_path, "direct", dynamic(member_of("broken"), member_of("middle")))
    write(tmp_path, "last", dynamic(member_of("direct"), member_of("middle")))
    write(tmp_path, "fine", dynamic(member_of("other")))
    write(tmp_path, "other", dynamic({"property": "recipient.x", "operator": "exists"}))
    found = load_definition_set(tmp_path)
    assert set(found.definitions) == {"fine", "other"}

    def named(key):
        return [p.message.split("'")[1] for p in found.skipped[key]]

    assert named("middle") == ["broken"]
    assert named("direct") == ["broken"]
    assert named("last") == ["direct", "middle"]


def test_keys_that_collide_with_sql_audiences_or_engine_models_are_refused_by_name(tmp_path):
    """Issue 25: a definition whose model (relation, file) would be a hand-written SQL audience's
    (names compared ignoring case), an engine model's, or too long for a file name is refused by
    name; the others are used."""
    exists = {"property": "recipient.x", "operator": "exists"}
    write(tmp_path, "power-users", dynamic(exists))
    write(tmp_path, "audience-members", dynamic(exists))
    write(tmp_path, "int_users_flattened", dynamic(exists))
    long_key = "k" * 252
    write(tmp_path, long_key, dynamic(exists))
    write(tmp_path, "fine", dynamic(exists))
    found = load_definition_set(tmp_path, other_audiences=["Power_Users"])
    messages = [str(problem) for problem in found.problems]
    assert set(found.definitions) == {"fine"}
    assert any(
        "power-users/audience.json: $: key 'power-users' maps to the model name 'power_users' of "
        "the hand-written SQL audience models/audiences/custom/Power_Users.sql" in m
        for m in messages
    )
    assert any(
        "key 'audience-members' maps to the model name 'audience_members', which the engine's" in m
        for m in messages
    )
    assert any("key 'int_users_flattened' maps to the model name" in m for m in messages)
    assert any(f"key '{long_key}' is 252 bytes long" in m for m in messages)


# Two property names whose hashed column stems clash (the first 10 hex digits of their SHA-1 are
# equal, found by a birthday search): the only way two paths can share columns.
CLASHING_PROPERTIES = ("XXxxXxXXxxXxxXxxXxxXxxxxxxxxxx", "xXxxxXxXxxXXXXxXxxxxXxxxxxxxxx")


def test_snake_case_columns_are_distinct_for_distinct_paths():
    """Issue 14 item 8: a property's columns read `address__country__kind`, and paths that a naive
    snake_case would merge (`a.b` and `a__b`, `a_.b` and `a._b`, case) keep apart."""
    from audiences.conditions.compiler import Attribute, property_slug

    assert Attribute(("address", "country"), "kind").column_name == "address__country__kind"
    assert Attribute(("plan",), "text").column_name == "plan__text"
    tricky = [
        ("a", "b"),
        ("a__b",),
        ("a_b",),
        ("a_", "b"),
        ("a", "_b"),
        ("a___b",),
        ("a.b",),
        ("A", "b"),
        ("a", "B"),
        ("a", "b", "c"),
        ("a__b", "c"),
        ("a", "b__c"),
        ("1st",),
        ('a"; drop table users; --',),
    ]
    stems = [property_slug(path).casefold() for path in tricky]
    assert len(set(stems)) == len(tricky), stems
    assert property_slug(CLASHING_PROPERTIES[:1]) == property_slug(CLASHING_PROPERTIES[1:])


def test_two_properties_that_would_share_columns_make_their_audiences_unusable(tmp_path):
    """The definitions reading either of two properties with the same columns are skipped, with a
    problem naming both properties and the condition; the other audiences are evaluated."""
    first, second = (f"recipient.{name}" for name in CLASHING_PROPERTIES)
    write(tmp_path, "first", dynamic({"property": first, "operator": "exists"}))
    write(tmp_path, "second", dynamic({"property": second, "operator": "exists"}))
    write(tmp_path, "fine", dynamic({"property": "recipient.plan", "operator": "exists"}))
    found = load_definition_set(tmp_path)
    assert sorted(found.definitions) == ["fine"]
    assert sorted(found.skipped) == ["first", "second"]
    message = str(found.skipped["first"][0])
    assert repr(first) in message and repr(second) in message
    assert "map to the same columns" in message and "$.segments[0]" in message
    assert any("map to the same columns" in problem for problem in problems_of(tmp_path))


def test_the_workflow_setup_reads_the_audience_keys_without_compiling(tmp_path, monkeypatch):
    """Issue 25: checking the triggers against the audiences needs only their keys, but loading
    them compiled every condition of every definition again, in each run's
    `audience_definitions` asset (seconds at 2,000 audiences). The keys are the same set, broken
    definitions included."""
    import shutil

    import audiences.conditions.compiler as compiler_module
    from audiences.conditions.definitions import _parse_text, definition_keys
    from audiences.delivery.setup import load_workflow_setup
    from audiences.settings import Settings

    folder = shutil.copytree(ROOT / "data" / "audiences", tmp_path / "audiences")
    write(folder, "broken", dynamic({"property": "recipient.a", "operator": "no_such"}))
    assert definition_keys(folder) == load_definition_set(folder).keys
    assert "broken" in definition_keys(folder)
    compiled = []
    real = compiler_module.compile_segments
    monkeypatch.setattr(
        compiler_module,
        "compile_segments",
        lambda *args, **kwargs: compiled.append(1) or real(*args, **kwargs),
    )
    _parse_text.cache_clear()  # as in a new process
    settings = Settings.from_env(
        {}, definitions_dir=folder, workflows_dir=ROOT / "data" / "workflows"
    )
    setup = load_workflow_setup(settings)
    assert setup.triggers  # the sample's triggers, checked against the keys
    # only the triggers' own conditions, none of the audiences'
    assert len(compiled) <= len(setup.triggers) < 18
