"""Static audiences and guides: `add`, `remove`, `check`, `upload`, `sync`, `eligible`."""

from __future__ import annotations

from pathlib import Path

from audiences.cli.common import open_store, read_warehouse, usable_definitions
from audiences.settings import Settings


def _audience_types(settings: Settings, store) -> dict[str, str]:
    from audiences.store.members import audience_types

    return audience_types(store, usable_definitions(settings))


def add(settings: Settings, arguments) -> int:
    """Add a user to a static audience (with --tenant, under that tenant). Adding an existing member
    changes nothing; a user not identified yet is kept as a missing user."""
    return _change(settings, arguments, "add")


def remove(settings: Settings, arguments) -> int:
    """Remove a user (the membership with --tenant, or the one without tenant) from a static
    audience. Removing a non-member changes nothing."""
    return _change(settings, arguments, "remove")


def _change(settings: Settings, arguments, action: str) -> int:
    from audiences.store.members import Member, change_members, require_static
    from audiences.store.profiles import get_profile

    if action == "add":  # the API's rule: an id the warehouse's loader would quarantine is refused
        from audiences.identifiers import id_problem, tenant_problem
        from audiences.store.members import MembershipError

        problem = id_problem(arguments.user_id)
        if problem:
            raise MembershipError(f"user id: {problem}")
        problem = tenant_problem(arguments.tenant)
        if problem:
            raise MembershipError(f"--tenant: {problem}")
    store = open_store(settings)
    require_static(arguments.audience, _audience_types(settings, store))
    result = change_members(
        store,
        arguments.audience,
        [Member(arguments.user_id, arguments.tenant)],
        action,
        source="manual",
    )
    tenant = f" with tenant {arguments.tenant!r}" if arguments.tenant else ""
    if not result.changed:
        relation = "already a member of" if action == "add" else "not a member of"
        print(f"no change: {arguments.user_id} {relation} {arguments.audience}{tenant}")
        return 0
    verb = {"add": "added to", "remove": "removed from"}[action]
    missing = action == "add" and get_profile(store, arguments.user_id) is None
    note = (
        " (no such user yet: kept as a missing user, and identifying them later triggers nothing)"
        if missing
        else ""
    )
    print(f"{arguments.user_id} {verb} {arguments.audience}{tenant}{note}")
    return 0


def check(settings: Settings, arguments) -> int:
    """Tenant-strict membership check: a member only when the membership's tenant equals --tenant
    (no --tenant: only a membership without tenant counts). Exit code 0 when a member, 1 when not."""
    from audiences.identifiers import tenant_problem
    from audiences.store.members import MembershipError, is_member

    problem = tenant_problem(arguments.tenant)
    if problem:  # the API's rule: such a tenant is refused, never a member
        raise MembershipError(f"--tenant: {problem}")
    store = open_store(settings)
    if arguments.audience not in _audience_types(settings, store):
        raise ValueError(f"unknown audience {arguments.audience!r}")
    member = is_member(store, arguments.audience, arguments.user_id, arguments.tenant)
    scope = f"with tenant {arguments.tenant!r}" if arguments.tenant else "with no tenant"
    print(
        f"{arguments.user_id} is {'a member' if member else 'not a member'} of {arguments.audience} {scope}"
    )
    return 0 if member else 1


def upload(settings: Settings, arguments) -> int:
    """Upload a CSV file into a static audience: map columns to user fields (--map column=field,
    dots for nested properties), upsert the users, add them as members (tenant from
    --tenant-column). Rows with a missing or malformed id are skipped and written to a rejects file."""
    from audiences.static.uploads import after_answer, parse_mapping, upload_csv
    from audiences.store.profiles import apply_uploads

    store = open_store(settings)
    result = upload_csv(
        store,
        arguments.audience,
        Path(arguments.file),
        _audience_types(settings, store),
        parse_mapping(arguments.map),
        arguments.tenant_column,
        settings.upload_max_bytes,
        Path(arguments.rejects) if arguments.rejects else None,
        apply_patches=False,
    )
    # Answered once journaled: the members, events and patches are written after the answer.
    print(
        f"{arguments.file}: {result.rows:,} rows, {result.members_added:,} members added, "
        f"{result.members_unchanged:,} already members, {result.rejected:,} rejected"
        + (f" (see {result.rejects_file})" if result.rejects_file else "")
        + (f", {result.blank_lines} blank lines skipped" if result.blank_lines else ""),
        flush=True,
    )
    after_answer()
    apply_uploads(store)
    return 0


def sync(settings: Settings, arguments) -> int:
    """Run warehouse syncs (syncs.yml): each diffs its table or query against what it last wrote
    and applies only the changes, in insert or mirror mode; mass removals are held."""
    from audiences.membership.changes import CircuitBreaker
    from audiences.static.syncs import load_syncs, run_sync

    store = open_store(settings)
    types = _audience_types(settings, store)
    syncs = [
        s
        for s in load_syncs(settings.syncs_file)
        if not arguments.names or s.name in arguments.names
    ]
    if not syncs:
        raise ValueError(f"no syncs to run in {settings.syncs_file}")
    for one in syncs:
        result = run_sync(
            store, one, types, CircuitBreaker(settings.breaker_share, settings.breaker_minimum)
        )
        held = f"; removals held as {result.held_batch}" if result.held_batch else ""
        print(
            f"{result.name}: {result.rows:,} rows, +{result.added:,} -{result.removed:,}, "
            f"{result.rejected:,} rejected{held}"
        )
    return 0


def eligible(settings: Settings, arguments) -> int:
    """Guide eligibility for a user (and the request's tenant): the guide's audience, with Knock's
    tenancy strict mode, and its property conditions. Exit code 0 when eligible, 1 when not."""
    from audiences.warehouse.evaluation import evaluation_time_for
    from audiences.workflows.guides import eligible as guide_eligibility
    from audiences.workflows.guides import load_guide

    guide = load_guide(settings.guides_dir, arguments.guide)
    with read_warehouse(settings) as connection:
        result = guide_eligibility(
            guide,
            arguments.user_id,
            arguments.tenant,
            open_store(settings),
            connection,
            evaluation_time_for(settings.evaluation_time),
        )
    print(
        f"{arguments.user_id} is {'eligible' if result.eligible else 'not eligible'} for {arguments.guide}: "
        f"{result.reason}"
    )
    return 0 if result.eligible else 1


def register(command) -> None:
    """Add this group's commands to the parser (`command` makes one subcommand)."""
    for name, handler, text in (
        ("add", add, "add a member to a static audience"),
        ("remove", remove, "remove a member from a static audience"),
        ("check", check, "is this user a member (tenant-strict)?"),
    ):
        sub = command(name, handler, text)
        sub.add_argument("audience", help="the audience key")
        sub.add_argument("user_id", help="the user's id")
        sub.add_argument("--tenant", help="the tenant (none: the membership without tenant)")
    sub = command("upload", upload, "upload a CSV file of users into a static audience")
    sub.add_argument("audience", help="the static audience key")
    sub.add_argument(
        "file", help="the CSV file (at most 10 MB unless AUDIENCES_UPLOAD_MAX_BYTES says otherwise)"
    )
    sub.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="COLUMN=FIELD",
        help="map a column to a user field or custom property (dots nest); repeatable",
    )
    sub.add_argument("--tenant-column", help="the column that holds each membership's tenant")
    sub.add_argument(
        "--rejects",
        help="where to write rejected rows (default: beside the file, up.rejects.csv for up.csv)",
    )
    sub = command("sync", sync, "run the warehouse syncs that feed static audiences")
    sub.add_argument(
        "names", nargs="*", help="only these syncs (default: every sync in the syncs file)"
    )
    sub = command("eligible", eligible, "is this user eligible for a guide?")
    sub.add_argument("guide", help="the guide key (a folder of the guides folder)")
    sub.add_argument("user_id", help="the user's id")
    sub.add_argument("--tenant", help="the request's tenant")
