"""Commits of audience definitions, kept in each environment's store, and their promotion.

A commit is one audience's full definition at one moment (Knock keeps one commit per resource):
id, author, time, message, the definition and its content hash. `commit_changes` records one for
every audience whose working file differs from the first environment's latest commit, all under
one message. Each environment's store holds the commits that reached it, in the order they were
made (`position`), so an environment's version of an audience is its latest commit there.
`promote` copies the commits of the environment before the target that the target lacks, in one
transaction of the target's store: a refused or failed promotion leaves both stores as they were.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from audiences.api.keys import bind_store
from audiences.conditions.definitions import (
    DEFINITION_FILE,
    KEY_PATTERN,
    DefinitionError,
    Problem,
    parse_definition,
    validate_definitions,
)
from audiences.settings import Settings, format_time
from audiences.store import database as tables
from audiences.store.commits import definition_commits
from audiences.store.database import MembershipStore, now_text

PROMOTION_MARKER = "promotion_in_progress"
# A promotion that crashed leaves its marker; after this long it no longer blocks commits.
PROMOTION_LEASE = timedelta(minutes=30)
READONLY_FIELDS = ("key", "environment", "created_at", "updated_at", "sha", "$schema", "__readonly")


class LifecycleError(ValueError):
    """A refused commit, promotion or archive: the message names the audience, field, commit or
    environment, and says what to do instead. Nothing was written."""


def canonical(definition: dict) -> str:
    return json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(definition: dict) -> str:
    return hashlib.sha256(canonical(definition).encode()).hexdigest()


def clean_definition(document: dict) -> dict:
    """An audience document without the fields Knock marks read-only (and its CLI's `$schema`):
    what a definition file holds."""
    return {name: value for name, value in document.items() if name not in READONLY_FIELDS}


def open_store(settings: Settings, environment: str) -> MembershipStore:
    """The environment's store, created if new and refused if it belongs to another environment."""
    store = MembershipStore(settings.store_url_for(environment)).create()
    bind_store(store, environment)
    return store


def require_environment(settings: Settings, environment: str) -> int:
    """The environment's place in the promotion order; an unknown name is refused."""
    if environment not in settings.environments:
        raise LifecycleError(
            f"unknown environment {environment!r}; the environments are "
            f"{', '.join(settings.environments)} (AUDIENCES_ENVIRONMENTS)"
        )
    return settings.environments.index(environment)


# -- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Commit:
    commit_id: str
    position: int
    audience_key: str
    action: str
    definition: dict | None
    version: str | None
    content_hash: str | None
    message: str
    author: str
    created_at: str
    environment: str
    promoted_at: str | None

    @classmethod
    def from_row(cls, row) -> Commit:
        values = dict(row._mapping) if hasattr(row, "_mapping") else dict(row)
        values["definition"] = json.loads(values["definition"]) if values["definition"] else None
        return cls(**values)

    def row(self, promoted_at: str | None = None) -> dict:
        values = dict(self.__dict__)
        values["definition"] = canonical(self.definition) if self.definition is not None else None
        values["promoted_at"] = promoted_at
        return values


def commits_in(store: MembershipStore, audience: str | None = None) -> list[Commit]:
    """The commits that reached this store, oldest first (optionally one audience's)."""
    query = sa.select(definition_commits).order_by(definition_commits.c.position)
    if audience:
        query = query.where(definition_commits.c.audience_key == audience)
    with store.read_engine.connect() as connection:
        return [Commit.from_row(row) for row in connection.execute(query)]


def current_versions(store: MembershipStore) -> dict[str, Commit]:
    """Each audience's latest commit in this store (an archive included)."""
    latest: dict[str, Commit] = {}
    for commit in commits_in(store):
        latest[commit.audience_key] = commit
    return latest


def live_definitions(store: MembershipStore) -> dict[str, dict]:
    """The definitions in force in this store's environment: latest commits that are not archives."""
    return {
        key: commit.definition
        for key, commit in current_versions(store).items()
        if commit.action == "commit"
    }


def stored_commits(url: str, key: str) -> list[Commit]:
    """One audience's commits in the store at `url`, oldest first, read without creating the
    store (none when it or its commits table does not exist): for commands that only look."""
    database = sa.engine.make_url(url).database
    if url.startswith("sqlite") and database and not Path(database).expanduser().exists():
        return []
    store = MembershipStore(url)
    try:
        if not sa.inspect(store.read_engine).has_table(definition_commits.name):
            return []
        return commits_in(store, key)
    finally:
        store.dispose()


def describe_version(commits: list[Commit], version: str | None, at: datetime | None = None) -> str:
    """A definition version named the way `members --at` and `explain` print it, from the
    audience's commits in an environment (`stored_commits`): the commit of that content (id, message, author, when it reached the
    environment), the latest one by `at` when there is one (a rollback commits old content
    again), else the first; or that it is not committed."""
    matching = [
        commit for commit in commits if commit.action == "commit" and commit.version == version
    ]
    limit = format_time(at) if at is not None else None
    by_then = [commit for commit in matching if limit is None or _reached(commit) <= limit]
    if not matching:
        return f"version {version}, not committed"
    commit = by_then[-1] if by_then else matching[0]
    return (
        f"version {version}, commit {commit.commit_id} ({commit.message!r}, {commit.author}, "
        f"{_reached(commit)})"
    )


def describe_archive(commits: list[Commit]) -> str | None:
    """The archive commit of an audience archived in its commits' environment, or None."""
    latest = commits[-1] if commits else None
    if latest is None or latest.action != "archive":
        return None
    return (
        f"archived by commit {latest.commit_id} ({latest.message!r}, {latest.author}, "
        f"{_reached(latest)})"
    )


def _reached(commit: Commit) -> str:
    """When the commit reached its store's environment: promoted there, or made there."""
    return commit.promoted_at or commit.created_at


@dataclass(frozen=True)
class Change:
    """One uncommitted change: an audience whose working file differs from its latest commit."""

    key: str
    kind: str  # created | modified | deleted
    definition: dict | None
    previous: dict | None


def working_documents(folder: Path) -> tuple[dict[str, dict], list[Problem]]:
    """Every `<key>/audience.json` under the folder as JSON, with a problem for each that is not a
    JSON object."""
    documents, problems = {}, []
    if not folder.is_dir():
        return documents, problems
    for path in sorted(folder.glob(f"*/{DEFINITION_FILE}")):
        key = path.parent.name
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            problems.append(Problem(str(path), "$", f"not valid JSON: {error}"))
            continue
        if not isinstance(document, dict):
            problems.append(Problem(str(path), "$", "an audience definition must be a JSON object"))
            continue
        documents[key] = clean_definition(document)
    return documents, problems


def uncommitted_changes(settings: Settings, environment: str | None = None) -> list[Change]:
    """What `commit` would record: the working files compared with the environment's latest
    commits (by default the first environment's; for a later one, what a forced commit there
    would record)."""
    environment = environment or settings.development_environment
    documents, _ = working_documents(settings.working_definitions_dir)
    store = open_store(settings, environment)
    try:
        live = live_definitions(store)
    finally:
        store.dispose()
    changes = [
        Change(key, "created" if key not in live else "modified", document, live.get(key))
        for key, document in sorted(documents.items())
        if key not in live or content_hash(document) != content_hash(live[key])
    ]
    changes += [
        Change(key, "deleted", None, live[key]) for key in sorted(set(live) - set(documents))
    ]
    return changes


# -- committing ---------------------------------------------------------------------------------


def default_author() -> str:
    return os.environ.get("AUDIENCES_AUTHOR") or getpass.getuser()


def check_definitions(
    settings: Settings,
    documents: dict[str, dict],
    folder: Path,
    stores: list[MembershipStore],
    problems: list[Problem] | None = None,
) -> None:
    """Refuse definitions that `validate` would refuse: each problem names the audience's file and
    JSON path. Types are checked against every environment's committed versions, so a commit never
    changes an audience's type anywhere."""
    from audiences.dbt.models import custom_audience_keys

    custom = custom_audience_keys(settings.dbt_project_dir_for(settings.development_environment))
    found = problems[:] if problems else []
    definitions = {}
    for key, document in documents.items():
        try:
            definitions[key] = parse_definition(document, key, folder / key / DEFINITION_FILE)
        except DefinitionError as error:
            found += error.problems
    existing: dict[str, str] = {}
    for store in stores:
        for key, definition in live_definitions(store).items():
            existing.setdefault(key, definition.get("type"))
    found += validate_definitions(definitions, custom, existing)
    if found:
        raise DefinitionError(found)


def commit_changes(
    settings: Settings,
    message: str,
    *,
    environment: str | None = None,
    author: str | None = None,
    force: bool = False,
    keys: set[str] | None = None,
) -> list[Commit]:
    """Record a commit for every changed audience (or those in `keys`) in the environment's store
    (by default the first's). Committing in a later environment is editing it directly: refused
    unless forced. The whole working set must validate. Deleted files are not commits: archiving
    is (`archive`). Returns the commits made."""
    environment = environment or settings.development_environment
    place = require_environment(settings, environment)
    if place > 0 and not force:
        raise LifecycleError(
            f"{environment} receives definitions by promotion: commit in "
            f"{settings.development_environment} (`audiences commit -m ...`), then "
            f"`audiences promote --to {settings.environments[1]}`; --force commits to {environment} directly"
        )
    if not message or not message.strip():
        raise LifecycleError("a commit needs a message (-m/--message)")
    changes = [
        change
        for change in uncommitted_changes(settings, environment)
        if change.kind != "deleted" and (keys is None or change.key in keys)
    ]
    if keys:
        unknown = sorted(keys - {change.key for change in changes})
        if unknown:
            raise LifecycleError(
                f"nothing to commit for {', '.join(unknown)}: no uncommitted change in "
                f"{settings.working_definitions_dir}"
            )
    if not changes:
        raise LifecycleError(
            f"nothing to commit: the definitions in {settings.working_definitions_dir} match "
            f"{environment}'s latest commits"
        )
    stores = [open_store(settings, name) for name in settings.environments]
    try:
        documents, problems = working_documents(settings.working_definitions_dir)
        folder = settings.working_definitions_dir
        check_definitions(settings, documents, folder, stores, problems)
        store = stores[place]
        made_at, author = now_text(), author or default_author()
        with store.engine.begin() as connection:
            refuse_during_promotion(connection, environment)
            position = next_position(stores)
            commits = [
                Commit(
                    commit_id=str(uuid.uuid4()),
                    position=position + number,
                    audience_key=change.key,
                    action="commit",
                    definition=change.definition,
                    version=parse_definition(
                        change.definition, change.key, folder / change.key / DEFINITION_FILE
                    ).version,
                    content_hash=content_hash(change.definition),
                    message=message.strip(),
                    author=author,
                    created_at=made_at,
                    environment=environment,
                    promoted_at=None,
                )
                for number, change in enumerate(changes)
            ]
            connection.execute(
                definition_commits.insert(),
                [commit.row(made_at if place > 0 else None) for commit in commits],
            )
    finally:
        for each in stores:
            each.dispose()
    if place > 0:
        write_environment(settings, environment)
    return commits


def next_position(stores: list[MembershipStore]) -> int:
    """One past the highest position in any store: positions order commits across environments."""
    highest = 0
    for store in stores:
        with store.read_engine.connect() as connection:
            value = connection.execute(
                sa.select(sa.func.max(definition_commits.c.position))
            ).scalar()
        highest = max(highest, value or 0)
    return highest + 1


def refuse_during_promotion(connection, environment: str) -> None:
    """A commit, or another promotion, while a promotion reads this store would race it: refused,
    naming the promotion. A marker older than the lease is a crashed promotion's and is ignored."""
    markers = tables.store_markers
    value = connection.execute(
        sa.select(markers.c.value).where(markers.c.name == PROMOTION_MARKER)
    ).scalar()
    if not value:
        return
    marker = json.loads(value)
    started = datetime.fromisoformat(marker["started_at"].replace("Z", "+00:00"))
    if datetime.now(UTC) - started < PROMOTION_LEASE:
        raise LifecycleError(
            f"a promotion from {environment} to {marker['to']} is in progress (started "
            f"{marker['started_at']}); nothing was changed: run this again when it has finished"
        )


@contextmanager
def promotion_marker(store: MembershipStore, source: str, target: str) -> Iterator[None]:
    """Mark the source environment's store as being promoted from, for the promotion's length:
    commits and other promotions from it are refused meanwhile."""
    markers = tables.store_markers
    with store.engine.begin() as connection:
        refuse_during_promotion(connection, source)
        connection.execute(markers.delete().where(markers.c.name == PROMOTION_MARKER))
        connection.execute(
            markers.insert().values(
                name=PROMOTION_MARKER, value=json.dumps({"to": target, "started_at": now_text()})
            )
        )
    try:
        yield
    finally:
        with store.engine.begin() as connection:
            connection.execute(markers.delete().where(markers.c.name == PROMOTION_MARKER))


# -- promoting ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Promotion:
    """What a promotion moves: the commits, in order, and each changed audience's definition in
    the target before and after (None: absent, or archived)."""

    source: str
    target: str
    commits: list[Commit]
    before: dict[str, dict | None]
    after: dict[str, dict | None]

    @property
    def changed(self) -> list[str]:
        return [key for key in self.after if self.before.get(key) != self.after[key]]


def plan_promotion(settings: Settings, to: str, commit_id: str | None = None) -> Promotion:
    """The commits `promote --to` would move, without writing anything: all those of the
    environment before `to` that `to` lacks, or only `commit_id`. Refuses an unknown environment,
    the first one (it is committed to, not promoted to), and a commit that does not exist in the
    environment before the target or is already in the target."""
    place = require_environment(settings, to)
    if place == 0:
        raise LifecycleError(
            f"{to} is the first environment: definitions are committed there (`audiences commit`), "
            f"not promoted; promote to {', '.join(settings.environments[1:]) or 'a later environment'}"
        )
    source = settings.environments[place - 1]
    source_store, target_store = open_store(settings, source), open_store(settings, to)
    try:
        waiting = [
            commit
            for commit in commits_in(source_store)
            if commit.commit_id not in {c.commit_id for c in commits_in(target_store)}
        ]
        if commit_id is not None:
            chosen = [commit for commit in waiting if commit.commit_id == commit_id]
            if not chosen:
                raise LifecycleError(_missing_commit(settings, commit_id, source, to))
            waiting = chosen
        before_versions = live_definitions(target_store)
    finally:
        source_store.dispose()
        target_store.dispose()
    before, after = {}, {}
    latest_positions = {key: commit.position for key, commit in _latest(settings, to).items()}
    for commit in waiting:
        if commit.position < latest_positions.get(commit.audience_key, 0):
            continue  # an older commit of an audience the target already has newer
        before.setdefault(commit.audience_key, before_versions.get(commit.audience_key))
        after[commit.audience_key] = commit.definition
    return Promotion(source, to, waiting, before, after)


def _latest(settings: Settings, environment: str) -> dict[str, Commit]:
    store = open_store(settings, environment)
    try:
        return current_versions(store)
    finally:
        store.dispose()


def _missing_commit(settings: Settings, commit_id: str, source: str, target: str) -> str:
    """Why a commit cannot be promoted to the target: where it is, or that it exists nowhere."""
    found_in = []
    for name in settings.environments:
        store = open_store(settings, name)
        try:
            with store.read_engine.connect() as connection:
                if connection.execute(
                    sa.select(definition_commits.c.commit_id).where(
                        definition_commits.c.commit_id == commit_id
                    )
                ).first():
                    found_in.append(name)
        finally:
            store.dispose()
    if not found_in:
        return f"commit {commit_id!r} does not exist (`audiences commits` lists them)"
    if target in found_in:
        return f"commit {commit_id!r} is already in {target}"
    return (
        f"commit {commit_id!r} is in {', '.join(found_in)} but not in {source}: promote it to "
        f"{source} first"
    )


def promote(settings: Settings, to: str, commit_id: str | None = None) -> Promotion:
    """Copy the planned commits into the target's store in one transaction, then write the
    target's definitions folder and dbt project from its store. Refused while another promotion
    from the same environment runs; commits there wait for this one to end (refused meanwhile)."""
    promotion = plan_promotion(settings, to, commit_id)
    if not promotion.commits:
        raise LifecycleError(f"nothing to promote: {to} has every commit of {promotion.source}")
    source_store, target_store = open_store(settings, promotion.source), open_store(settings, to)
    try:
        with promotion_marker(source_store, promotion.source, to):
            promoted_at = now_text()
            with target_store.engine.begin() as connection:
                present = set(
                    connection.execute(sa.select(definition_commits.c.commit_id)).scalars()
                )
                rows = [
                    commit.row(promoted_at)
                    for commit in promotion.commits
                    if commit.commit_id not in present
                ]
                if rows:
                    connection.execute(definition_commits.insert(), rows)
            write_environment(settings, to)
    finally:
        source_store.dispose()
        target_store.dispose()
    return promotion


# -- archiving ----------------------------------------------------------------------------------


def archive(
    settings: Settings, key: str, message: str | None = None, author: str | None = None
) -> Commit:
    """Archive an audience in every environment (Knock's rule): an archive commit in each store,
    its working folder removed, and each later environment's definitions written again. The
    audience is no longer evaluated anywhere, so its triggers stop."""
    if not KEY_PATTERN.fullmatch(key):
        raise LifecycleError(
            f"bad audience key {key!r}: use lower-case letters, digits, '-' and '_'"
        )
    stores = [open_store(settings, name) for name in settings.environments]
    try:
        known = any(key in live_definitions(store) for store in stores)
        working = settings.working_definitions_dir / key
        if not known and not (working / DEFINITION_FILE).exists():
            raise LifecycleError(f"unknown audience {key!r}: it is committed in no environment")
        made_at = now_text()
        commit = Commit(
            commit_id=str(uuid.uuid4()),
            position=next_position(stores),
            audience_key=key,
            action="archive",
            definition=None,
            version=None,
            content_hash=None,
            message=(message or f"archive {key}").strip(),
            author=author or default_author(),
            created_at=made_at,
            environment=settings.development_environment,
            promoted_at=None,
        )
        for place, store in enumerate(stores):
            with store.engine.begin() as connection:
                connection.execute(
                    definition_commits.insert().values(commit.row(made_at if place else None))
                )
    finally:
        for store in stores:
            store.dispose()
    if (settings.working_definitions_dir / key).is_dir():
        shutil.rmtree(settings.working_definitions_dir / key)
    for name in settings.environments[1:]:
        write_environment(settings, name)
    return commit


# -- an environment's files ---------------------------------------------------------------------


def write_definition(folder: Path, key: str, definition: dict) -> Path:
    """One definition in the Knock CLI layout, `<folder>/<key>/audience.json`, two-space JSON."""
    path = folder / key / DEFINITION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(definition, indent=2, ensure_ascii=False) + "\n"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    return path


def version_metadata(settings: Settings) -> dict[str, dict[str, str]]:
    """Per audience model, the version the settings' environment evaluates: the commit id,
    message and author of its latest commit there, or "uncommitted" where the first
    environment's working file differs from it (what the Dagster UI shows on each audience)."""
    from audiences.conditions.definitions import model_name_for

    store = MembershipStore(settings.store_url).create()
    try:
        latest = current_versions(store)
    finally:
        store.dispose()
    working: dict[str, dict] = {}
    if settings.environment == settings.development_environment:
        working, _ = working_documents(settings.working_definitions_dir)
    found = {}
    for key in set(latest) | set(working):
        commit = latest.get(key)
        if commit is not None and commit.action != "commit":
            continue
        if commit is None or (key in working and content_hash(working[key]) != commit.content_hash):
            found[model_name_for(key)] = {"commit_id": "uncommitted", "commit_message": ""}
        else:
            found[model_name_for(key)] = {
                "commit_id": commit.commit_id,
                "commit_message": commit.message,
                "commit_author": commit.author,
            }
    return found


def prepare_environment(settings: Settings) -> None:
    """Before a later environment evaluates: its definitions folder and dbt project written again
    from its store (the record), or a refusal when nothing was ever promoted to it."""
    environment = settings.environment
    if not settings.written_by_promotion(environment):
        return
    if not _has_commits(settings.store_url_for(environment)):
        raise LifecycleError(
            f"{environment} has no promoted definitions yet: commit in "
            f"{settings.development_environment} (`audiences commit -m ...`), then "
            f"`audiences promote --to {environment}`"
        )
    write_environment(settings, environment)


def _has_commits(url: str) -> bool:
    """Whether the store holds any commit, without creating it (a refusal writes nothing)."""
    database = sa.engine.make_url(url).database
    if url.startswith("sqlite") and database and not Path(database).expanduser().exists():
        return False
    store = MembershipStore(url)
    try:
        if not sa.inspect(store.read_engine).has_table(definition_commits.name):
            return False
        with store.read_engine.connect() as connection:
            return (
                connection.execute(sa.select(definition_commits.c.commit_id).limit(1)).first()
                is not None
            )
    finally:
        store.dispose()


def write_environment(settings: Settings, environment: str) -> None:
    """Write a later environment's definitions folder from its store (its live definitions, no
    others), and give it its own copy of the first environment's dbt project to generate into.
    An environment whose definitions folder is set by AUDIENCES_DEFINITIONS_<ENV> is left alone."""
    if not settings.written_by_promotion(environment):
        return
    target = settings.for_environment(environment)
    store = open_store(settings, environment)
    try:
        live = live_definitions(store)
    finally:
        store.dispose()
    folder = target.definitions_dir
    folder.mkdir(parents=True, exist_ok=True)
    for key, definition in live.items():
        write_definition(folder, key, definition)
    for entry in folder.iterdir():
        if entry.is_dir() and entry.name not in live:
            shutil.rmtree(entry)
    copy_dbt_project(
        settings.dbt_project_dir_for(settings.development_environment), target.dbt_project_dir
    )


def copy_dbt_project(source: Path, target: Path) -> None:
    """The environment's dbt project: the first environment's without its generated audience
    models (written again from the environment's own definitions) or dbt's output. Custom SQL
    audiences and macros come along: they are promoted with the definitions."""
    from audiences.dbt.models import GENERATED_FOLDERS

    skip = {source / folder for folder in GENERATED_FOLDERS}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {
            name
            for name in names
            if name in ("target", "logs", "dbt_packages", ".user.yml")
            or Path(folder) / name in skip
        }

    kept = target / "target"
    staged = target.with_name(target.name + ".new")
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(source, staged, ignore=ignore)
    if kept.is_dir():  # the manifest and fingerprint: dbt parses again only if files changed
        shutil.move(str(kept), staged / "target")
    if target.exists():
        shutil.rmtree(target)
    staged.replace(target)
