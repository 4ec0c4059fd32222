"""Looking at audiences without changing anything: `preview`, `members`, `explain`, `events`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from audiences.cli.common import (
    TIME_FORMAT,
    open_store,
    read_warehouse,
    time_flag,
    usable_definitions,
)
from audiences.settings import Settings, format_time


def _definition(settings: Settings, key_or_file: str):
    from audiences.conditions.definitions import (
        DefinitionError,
        Problem,
        load_definition_file,
        load_definition_set,
        problems_of,
        references_to_skipped,
    )

    # Another audience's broken file does not matter here; this audience's errors (or those of an
    # audience it refers to) are the error.
    found = (
        load_definition_set(settings.definitions_dir) if settings.definitions_dir.is_dir() else None
    )
    definitions = found.definitions if found else {}
    path = Path(key_or_file)
    if path.suffix == ".json" or path.is_file():
        definition = load_definition_file(path)
        if found and (problems := references_to_skipped(definition, found.skipped)):
            raise DefinitionError(problems)
        # As a file of the folder would be checked: a reference to no audience, or a cycle
        # through this definition (which replaces the folder's audience of its key), is an error.
        definitions = {**definitions, definition.key: definition}
        if problems := problems_of(definition.key, definitions, found.skipped if found else ()):
            raise DefinitionError(problems)
        return definition, definitions
    if found is None:
        raise DefinitionError(
            [Problem(str(settings.definitions_dir), "$", f"no audience {key_or_file!r}")]
        )
    return found.require(key_or_file), definitions


def _chosen_time(settings: Settings, arguments, connection, default_to_last_evaluation: bool):
    """The time to evaluate at and where it came from: --evaluation-time, then
    AUDIENCES_EVALUATION_TIME, then the last evaluation's time (explain: what `members` shows) or
    now (preview: who matches now)."""
    from audiences.settings import utc_now
    from audiences.warehouse.evaluation import members_evaluated_at

    if arguments.evaluation_time is not None:
        return arguments.evaluation_time, "from --evaluation-time"
    if settings.evaluation_time is not None:
        where = (
            ".env"
            if "AUDIENCES_EVALUATION_TIME" in getattr(arguments, "from_dotenv", ())
            else "the environment"
        )
        return settings.evaluation_time, f"from AUDIENCES_EVALUATION_TIME in {where}"
    last = members_evaluated_at(connection)
    if default_to_last_evaluation:
        if last is not None:
            return (
                last,
                "the last evaluation's time, as `members` lists it; --evaluation-time picks another",
            )
        return utc_now(), "now: the warehouse has no evaluation yet"
    last_note = f"; the last evaluation was at {format_time(last)}" if last is not None else ""
    return utc_now(), f"now{last_note}; --evaluation-time picks another"


def preview(settings: Settings, arguments) -> int:
    """Count and sample the users that match an audience against the current warehouse, right now
    (or at --evaluation-time; the output says which, and when the last evaluation was). Nothing is
    written. The audience can be a key from the definitions folder or the path of an audience.json
    that is not committed yet."""
    from audiences.warehouse.queries import preview as run_preview

    definition, definitions = _definition(settings, arguments.audience)
    with read_warehouse(settings) as connection:
        now, source = _chosen_time(
            settings, arguments, connection, default_to_last_evaluation=False
        )
        result = run_preview(
            connection,
            definition,
            definitions,
            now,
            sample_size=arguments.sample,
            tenant=arguments.tenant,
        )
    share = (
        f" ({result.count / result.total_users:.1%} of {result.total_users:,})"
        if result.total_users
        else ""
    )
    what = "matching (user, tenant) pairs" if definition.per_tenant else "matching users"
    where = f" in tenant {arguments.tenant!r}" if arguments.tenant is not None else ""
    print(
        f"{definition.key}: {result.count:,} {what}{where}{share} at {format_time(result.evaluated_at)} ({source})"
    )
    for row in result.sample:
        print("  " + json.dumps(row, ensure_ascii=False))
    if arguments.sql:
        print(result.sql)
    return 0


def members(settings: Settings, arguments) -> int:
    """Print an audience's members, one JSON object per line: {"user_id": ..., "tenant": ...}.
    A dynamic audience's are those of its last evaluation; a static audience's are read from the
    membership store, so adds and removes show at once. With --at, the members at that time, from
    the warehouse's history (static changes reach it at the next run)."""
    from audiences.conditions.definitions import DefinitionError
    from audiences.membership.changes import members_at
    from audiences.store.members import audience_types
    from audiences.store.queries import current_members
    from audiences.warehouse.queries import members as list_members

    try:
        definitions = usable_definitions(settings)
    except DefinitionError:  # a broken file elsewhere must not hide the last evaluation
        definitions = {}
    defined = definitions.get(arguments.audience)
    if not arguments.at and (defined is None or defined.type == "static"):
        # Static, or not in the files (then maybe created in the store): ask the store, which a
        # dynamic audience's listing need not touch while a run writes to it.
        store = open_store(settings)
        if audience_types(store, definitions).get(arguments.audience) == "static":
            for member in current_members(store, arguments.audience):
                sys.stdout.write(json.dumps(member, ensure_ascii=False) + "\n")
            return 0
    with read_warehouse(settings) as connection:
        if arguments.at:
            rows = members_at(connection, arguments.audience, arguments.at)
            # The definition in force then, on stderr: stdout stays JSON lines.
            print(
                _version_note(settings, connection, arguments.audience, arguments.at),
                file=sys.stderr,
            )
        else:
            rows = list_members(connection, arguments.audience)
        for member in rows:
            sys.stdout.write(json.dumps(member, ensure_ascii=False) + "\n")
    return 0


def explain(settings: Settings, arguments) -> int:
    """Explain why a user is in or out of an audience: for each condition, the value seen and
    whether it holds, then each segment (conditions ANDed) and the verdict (segments ORed). The
    time is the last evaluation's, the one `members` lists, unless --evaluation-time (or
    AUDIENCES_EVALUATION_TIME) gives another; the output says which."""
    from audiences.lifecycle.commits import describe_version, stored_commits
    from audiences.warehouse.queries import explain as run_explain

    definition, definitions = _definition(settings, arguments.audience)
    with read_warehouse(settings) as connection:
        at, source = _chosen_time(settings, arguments, connection, default_to_last_evaluation=True)
        result = run_explain(
            connection, definition, definitions, arguments.user_id, at, tenant=arguments.tenant
        )
        in_force = _version_note(settings, connection, definition.key, at, definition.version)
    verdict = "IN" if result.is_member else "OUT"
    pair = f" in tenant {result.tenant!r}" if result.tenant is not None else ""
    print(
        f"{result.user_id}{pair} is {verdict} {definition.key} at {format_time(result.evaluated_at)} ({source})"
    )
    commits = stored_commits(settings.store_url, definition.key)
    print(f"  definition: {describe_version(commits, definition.version)}")
    if in_force:
        print(f"  {in_force}")
    current = 0
    for verdict_row in result.verdicts:
        if verdict_row.segment != current:
            current = verdict_row.segment
            held = result.segments[current - 1]
            print(f"  segment {current}: {'true' if held else 'false'} (all conditions must hold)")
        mark = "true " if verdict_row.result else "false"
        condition = verdict_row.condition
        argument = (
            f" {json.dumps(condition['argument'], ensure_ascii=False)}"
            if "argument" in condition
            else ""
        )
        print(
            f"    {mark}  {condition['property']} {condition['operator']}{argument}   (value: {verdict_row.value})"
        )
    if not result.segments:
        print("  no segments: nobody matches")
    return 0


def _version_note(settings: Settings, connection, key: str, at, explained: str | None = None):
    """Which definition the evaluation in force at `at` used, and its commit in this environment
    (`members --at`), or the archive that ended the audience; for `explain` (`explained`: the
    version it evaluates) only when that is not the version in force then, else None."""
    from audiences.lifecycle.commits import describe_archive, describe_version, stored_commits
    from audiences.warehouse.queries import version_at

    found = version_at(connection, key, at)
    if found is None:
        return f"{key}: no evaluation at or before {format_time(at)}"
    version, evaluated_at, still_evaluated = found
    commits = stored_commits(settings.store_url, key)
    archive = None if still_evaluated else describe_archive(commits)
    if explained is not None and archive is None and version == explained:
        return None
    described = archive or (
        f"the evaluation of {format_time(evaluated_at)} used "
        + describe_version(commits, version, at)
    )
    return f"{key} at {format_time(at)}: {described}"


def events(settings: Settings, arguments) -> int:
    """Print membership events from the store as JSON lines, oldest first, filtered by audience,
    user, type (entered / exited) and time."""
    from audiences.store.queries import list_events

    # The store keeps times as UTC ISO 8601 text in one format, so bounds are written the same way.
    since, until = (
        format_time(moment) if moment else None for moment in (arguments.since, arguments.until)
    )
    for event in list_events(
        open_store(settings),
        arguments.audience,
        arguments.user,
        arguments.type,
        since,
        until,
        arguments.limit,
    ):
        sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
    return 0


def register(command) -> None:
    """Add this group's commands to the parser (`command` makes one subcommand)."""
    sub = command(
        "preview", preview, "count and sample the users matching an audience, writing nothing"
    )
    sub.add_argument("audience", help="an audience key, or the path of an audience.json file")
    sub.add_argument(
        "--sample", type=int, default=10, help="how many matching users to show (default 10)"
    )
    sub.add_argument("--sql", action="store_true", help="also print the SQL that was run")
    sub.add_argument(
        "--tenant", help="a per-tenant audience: only the pairs of this tenant (default: all)"
    )
    sub = command("members", members, "list an audience's members as JSON lines")
    sub.add_argument("audience", help="the audience key")
    sub.add_argument(
        "--at",
        type=time_flag,
        metavar="TIME",
        help=f"who was a member at this time, {TIME_FORMAT} (from the membership history)",
    )
    sub = command("explain", explain, "show why a user is in or out of an audience")
    sub.add_argument("audience", help="an audience key, or the path of an audience.json file")
    sub.add_argument("user_id", help="the user's id")
    sub.add_argument(
        "--tenant", help="a per-tenant audience: the tenant of the (user, tenant) pair to explain"
    )
    sub = command("events", events, "list membership events as JSON lines")
    sub.add_argument("--audience", help="only this audience")
    sub.add_argument("--user", help="only this user id")
    sub.add_argument("--type", choices=["entered", "exited"], help="only entered or exited")
    sub.add_argument(
        "--since",
        type=time_flag,
        metavar="TIME",
        help=f"events at or after this time ({TIME_FORMAT})",
    )
    sub.add_argument(
        "--until", type=time_flag, metavar="TIME", help=f"events before this time ({TIME_FORMAT})"
    )
    sub.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
