"""What the API does, without HTTP: one `Environment` per environment the service serves.

Each environment has its own membership store (and so its own keys, members, users and events), its
definitions folder, and on SQLite a group-commit writer (writer.py). Every operation calls the same
domain functions as the command-line tool (`change_members`, `is_member`, `broadcast`, `eligible`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa

from audiences.api import idempotency
from audiences.api.errors import ApiError, invalid, not_found
from audiences.api.keys import StoreEnvironmentError, bind_store
from audiences.api.pages import storable_position
from audiences.api.writer import GroupCommitWriter, JournalApplier

if TYPE_CHECKING:
    from audiences.api.bulk import BulkWorker
    from audiences.api.realtime import RealtimeWorker
    from audiences.api.workers import WorkerClient
from audiences.conditions.definitions import (
    DEFINITION_FILE,
    KEY_PATTERN,
    declared_type,
    load_definition_set,
)
from audiences.settings import Settings
from audiences.static.uploads import after_answer, prepare_upload, record_upload
from audiences.store import database as tables
from audiences.store import profiles
from audiences.store.database import MembershipStore, normalize_tenant, now_text, tenant_key
from audiences.store.journal import IdentifyJournal, journal_of, journal_path
from audiences.store.members import (
    Member,
    MembershipError,
    apply_change,
    audience_types,
    change_members,
    create_static_audience,
    is_member,
    prepare_change,
)
from audiences.store.tenants import set_tenants
from audiences.users.sources import ROW_COLUMN

MAX_PROPERTIES_BYTES = 256 * 1024  # Knock's limit on a recipient's custom properties
MAX_NESTING = 100  # objects and arrays in properties and broadcast data
T = TypeVar("T")
_WRITER_LOCK = threading.Lock()


@dataclass
class Environment:
    name: str
    store: MembershipStore
    definitions_dir: Path
    settings: Settings
    _types: tuple[float, dict[str, str]] | None = None
    _writer: GroupCommitWriter | None = None
    _journal: IdentifyJournal | None = None
    _journal_writer: GroupCommitWriter | None = None  # the identify journal's group commit
    # Applies the identifies this process journaled to the store, then real time (api/writer.py).
    applier: JournalApplier | None = None
    bulk_worker: BulkWorker | None = None  # processes queued bulk operations (api/bulk.py)
    # Evaluates identified users at once (api/realtime.py); None when real time is off.
    realtime: RealtimeWorker | WorkerClient | None = None
    # `audiences serve`'s worker process (api/workers.py), which runs real time and delivery.
    worker: WorkerClient | None = None

    @classmethod
    def open(cls, settings: Settings, name: str) -> Environment:
        """Open the environment's store (refused if it belongs to another environment)."""
        store = MembershipStore(settings.store_url_for(name)).create()
        try:
            bind_store(store, name)
        except StoreEnvironmentError:
            store.dispose()
            raise
        return cls(name, store, settings.definitions_dir_for(name), settings)

    # -- audiences --------------------------------------------------------------------------------

    def audience_types(self) -> dict[str, str]:
        """Audience types from the definition files and the store's static audiences, re-read at
        most once a second (and at once after this process creates an audience)."""
        now = time.monotonic()
        if self._types is None or now - self._types[0] > 1.0:
            definitions: dict = {}
            declared: dict[str, str] = {}
            if self.definitions_dir.exists():
                # A definition with errors stops that audience, not the API: it keeps the type
                # its file declares (a run keeps its last members), and the others are served.
                loaded = load_definition_set(self.definitions_dir)
                definitions = loaded.definitions
                declared = {
                    key: declared_type(self.definitions_dir / key / DEFINITION_FILE)
                    for key in loaded.skipped
                }
            types = audience_types(self.store, definitions)
            for key, kind in declared.items():
                if kind is not None:
                    types.setdefault(key, kind)
            self._types = (now, types)
        return self._types[1]

    def require_audience(self, key: str) -> str:
        kind = self.audience_types().get(key)
        if kind is None:
            raise not_found(f"audience {key!r}")
        return kind

    def write(
        self, work: Callable[[sa.Connection], T], claim: idempotency.Claim | None = None
    ) -> T:
        """Run `work(connection)` atomically. On SQLite, concurrent writes share one commit (see
        writer.py); on PostgreSQL each runs in its own transaction. With an idempotency `claim`,
        the key is claimed and the answer (the work's result) recorded in that same transaction."""
        if claim is not None:
            work = idempotency.run_once(self.store, claim, work)
        if self.store.engine.dialect.name != "sqlite":
            with self.store.engine.begin() as connection:
                return work(connection)
        if self._writer is None:
            with _WRITER_LOCK:
                if self._writer is None:
                    self._writer = GroupCommitWriter(self.store.engine, f"writer-{self.name}")
        return self._writer.write(work)

    def identified(self, user_ids, changed=None) -> None:
        """Users whose identify committed: evaluate their audiences at once (with real time on);
        `changed`, the top-level properties it set on users that existed before, limits that to
        the audiences reading them (None: every audience)."""
        if self.realtime is not None:
            self.realtime.submit(user_ids, changed)

    def apply_journal(self) -> None:
        """Apply the identify journal's waiting entries (an API that died before applying them),
        and have real time evaluate their users (every audience): at the service's start."""
        self.identified(profiles.apply_journal(self.store))

    def close(self) -> None:
        if self.applier is not None:
            self.applier.close()  # the journaled identifies applied and handed to real time
        if self._journal_writer is not None:
            self._journal_writer.close()
        if self.bulk_worker is not None:
            self.bulk_worker.close()
        if self.realtime is not None:
            self.realtime.close()
        if self.worker is not None:
            self.worker.close()
        if self._writer is not None:
            self._writer.close()
        self.store.dispose()

    def change_members(
        self,
        key: str,
        members: list[dict],
        action: str,
        create_audience: bool = False,
        source: str = "api",
        claim: idempotency.Claim | None = None,
    ) -> tuple[int, int]:
        """Add or remove members (Knock's `AudienceMemberRequest`s), identifying inline users first;
        returns (changed, unchanged)."""
        self._static_audience(key, create_audience and action == "add")
        patches = []
        tenant_patches = []
        wanted = []
        for index, member in enumerate(members):
            user = member["user"]
            if action == "add" and len(user) > 1:  # more than an id: an inline identify
                properties = profiles.user_properties(user)
                check_properties(properties, f"members.{index}.user")
                if properties:
                    patches.append((user["id"], properties))
            tenant = member.get("tenant")
            if isinstance(tenant, dict):  # Knock's inline tenant: set it, and name it by its id
                if action == "add" and len(tenant) > 1:
                    details = {name: value for name, value in tenant.items() if name != "id"}
                    check_properties(details, f"members.{index}.tenant")
                    tenant_patches.append((tenant["id"], details))
                tenant = tenant["id"]
            wanted.append(Member(user["id"], tenant))
        try:
            change = prepare_change(key, wanted, action, source)
        except MembershipError as error:
            raise invalid("members", str(error)) from None
        identify = profiles.prepare_identify(patches)

        def work(connection):
            if tenant_patches:
                set_tenants(self.store, connection, tenant_patches)
            profiles.identify(self.store, connection, identify)
            return apply_change(self.store, connection, change)

        result = self.write(work, claim)
        self.identified(user_id for user_id, _ in patches)
        return result.changed, result.unchanged

    def _static_audience(self, key: str, create: bool) -> None:
        """Refuse a change to an unknown (unless `create`) or dynamic audience."""
        kind = self.audience_types().get(key)
        if kind is None:
            if not create:
                raise not_found(f"audience {key!r}")
            if not KEY_PATTERN.fullmatch(key):
                raise invalid("key", "an audience key uses lower-case letters, digits, '-' and '_'")
            create_static_audience(self.store, key)
            self._types = None
            kind = "static"
        if kind != "static":
            raise ApiError(
                422,
                "audience_not_static",
                f"{key!r} is a {kind} audience: its members come from its conditions and cannot be "
                "added or removed; use a static audience",
                field="key",
            )

    def upload(
        self,
        key: str,
        body: bytes,
        mapping: dict[str, str],
        tenant_column: str | None,
        create_audience: bool = False,
        claim: idempotency.Claim | None = None,
    ) -> dict:
        """Upload a CSV file (the request body) into a static audience, as `audiences upload` does:
        answered once its members and rows are journaled (one batch); its members and events are
        written right after, before any read or write of the store sees it, then its identify
        patches (`after_upload`)."""
        self._static_audience(key, create_audience)
        with tempfile.TemporaryDirectory(prefix="audiences-upload-") as folder:
            path = Path(folder) / "upload.csv"
            path.write_bytes(body)
            try:
                upload = prepare_upload(
                    key,
                    path,
                    self.audience_types(),
                    mapping,
                    tenant_column,
                    self.settings.upload_max_bytes,
                )
            except ValueError as error:  # UploadError, MembershipError, an unreadable file
                message = str(error).replace(str(path), "the uploaded file")
                raise invalid("body", message) from None

        def answer(connection) -> dict:
            # The answer is the work's result, so that an Idempotency-Key records it (it recorded
            # the ChangeResult, which is no JSON: every upload with a key failed with a 500).
            result = record_upload(self.store, connection, upload)
            return {
                "rows": upload.rows_read,
                "blank_lines": upload.blank_lines,
                "members_added": result.changed,
                "members_unchanged": result.unchanged,
                "users_identified": upload.users_identified,
                "rejected": [
                    {"row": row, "reason": reason, "id": user_id}
                    for row, reason, user_id in upload.quarantined.select(
                        ROW_COLUMN, "reason", "user_id"
                    ).iter_rows()
                ],
            }

        return self.write(answer, claim)

    def after_upload(self) -> int:
        """After an upload's answer: write what it journaled (`apply_uploads`)."""
        after_answer()
        return self.apply_uploads()

    def apply_uploads(self) -> int:
        """Apply the identify patches of uploads this store has queued (after an upload's answer,
        and when the service starts: an upload answered just before the process died)."""
        return profiles.apply_uploads(self.store)

    def list_members(
        self, key: str, page_size: int, after: str | None, before: str | None, tenant: str | None
    ) -> dict:
        """A page of members in Knock's shape, ordered by user id then tenant, with cursors."""
        self.require_audience(key)
        if after is not None and before is not None:
            raise invalid("before", "give `after` or `before`, not both")
        members, users = tables.audience_members, tables.user_profiles
        query = (
            sa.select(
                members.c.user_id,
                members.c.tenant,
                members.c.tenant_key,
                members.c.added_at,
                users.c.properties,
                users.c.updated_at,
                users.c.deleted_at,
            )
            .select_from(members.outerjoin(users, users.c.user_id == members.c.user_id))
            .where(members.c.audience_key == key)
        )
        if tenant is not None:
            query = query.where(members.c.tenant_key == tenant_key(tenant))
        position = sa.tuple_(members.c.user_id, members.c.tenant_key)
        if before is not None:
            query = query.where(
                position < sa.tuple_(*map(sa.literal, decode_cursor(before, "before")))
            )
            query = query.order_by(members.c.user_id.desc(), members.c.tenant_key.desc())
        else:
            if after is not None:
                query = query.where(
                    position > sa.tuple_(*map(sa.literal, decode_cursor(after, "after")))
                )
            query = query.order_by(members.c.user_id, members.c.tenant_key)
        rows = self.store.rows(query.limit(page_size + 1))
        more = len(rows) > page_size
        rows = rows[:page_size]
        if before is not None:
            rows.reverse()
        entries = [member_entry(row) for row in rows]
        first, last = (rows[0], rows[-1]) if rows else (None, None)
        has_next = more if before is None else True
        has_previous = (after is not None) if before is None else more
        return {
            "entries": entries,
            "page_info": {
                "__typename": "PageInfo",
                "page_size": page_size,
                "after": encode_cursor(last) if has_next and last else None,
                "before": encode_cursor(first) if has_previous and first else None,
            },
        }

    def check(self, key: str, user_id: str, tenant: str | None) -> dict:
        """The tenant-strict membership check (`is_member`, the same function `audiences check` uses)."""
        self.require_audience(key)
        member = is_member(self.store, key, user_id, tenant)
        return {
            "__typename": "AudienceMembership",
            "audience_key": key,
            "user_id": user_id,
            "tenant": tenant,
            "member": member,
        }

    # -- users ------------------------------------------------------------------------------------

    def identify(
        self, user_id: str, properties: dict, claim: idempotency.Claim | None = None
    ) -> dict:
        """Merge properties into the user (`null` removes one); returns the user in Knock's shape."""
        properties = profiles.user_properties(properties)
        check_properties(properties)
        existed = {}

        def work(connection):
            profile = profiles.identify(self.store, connection, [(user_id, properties)])[user_id]
            existed[user_id] = not profile.created
            return profile.as_knock_user()

        if claim is None and self.journal is not None:
            return self._journaled_identify(user_id, properties)
        user = self.write(work, claim)
        # Real time: an existing user's identify can move them only in audiences reading what it
        # set (an idempotent replay, which ran nothing, evaluates every audience).
        self.identified([user_id], list(properties) if existed.get(user_id) else None)
        return user

    def journal_applier(self) -> JournalApplier:
        """This process's applier of the identify journal (`api/writer.py`), started at first use."""
        with _WRITER_LOCK:
            if self.applier is None:
                self.applier = JournalApplier(self)
        return self.applier

    @property
    def journal(self) -> IdentifyJournal | None:
        """The store's identify journal (`store/journal.py`); None on PostgreSQL."""
        if self._journal is None and journal_path(self.store) is not None:
            self._journal = journal_of(self.store, create=True)
        return self._journal

    def _journaled_identify(self, user_id: str, properties: dict) -> dict:
        """An identify on a SQLite store: committed to the identify journal (its own file, lock
        and group commit), answered with the user as the store and the journal then hold them;
        the applier (in `audiences serve`'s worker process when real time runs there, else in
        this one) merges it into the store, then real time evaluates the user."""
        journal = self.journal
        entry = (user_id, profiles.dump_patch(properties), now_text())
        with _WRITER_LOCK:
            if self._journal_writer is None:
                self._journal_writer = GroupCommitWriter(journal.engine, f"journal-{self.name}")
        seq = self._journal_writer.write(lambda connection: journal.append(connection, [entry]))[0]
        if self.worker is not None and self.realtime is self.worker:
            # `audiences serve` with real time: the worker process applies it, then evaluates the
            # user, so this process's interpreter only journals and answers.
            self.worker.journaled(seq, user_id, properties)
        else:
            self.journal_applier().journaled(seq, user_id, properties)
        profile = profiles.get_profile(self.store, user_id)
        return profile.as_knock_user()

    def get_user(self, user_id: str) -> dict:
        profile = profiles.get_profile(self.store, user_id)
        if profile is None:
            raise not_found(f"user {user_id!r}")
        return profile.as_knock_user()

    def delete_user(self, user_id: str, claim: idempotency.Claim | None = None) -> None:
        """Delete a user: their static memberships end now, with exit events; dynamic audiences
        drop them at once with real time on, else at the next evaluation (the warehouse loads
        the deletion)."""
        self.audience_types()  # read before the write transaction, not inside it
        self.write(lambda connection: self.delete_user_in(connection, user_id), claim)
        self.identified([user_id])

    def delete_user_in(self, connection, user_id: str, missing_ok: bool = False) -> bool:
        """`delete_user` inside the caller's write transaction (bulk deletes and merges use it);
        False when the store knew no such user (404 unless `missing_ok`)."""
        types = self.audience_types()
        members = tables.audience_members
        memberships = connection.execute(
            sa.select(members.c.audience_key, members.c.tenant).where(members.c.user_id == user_id)
        ).all()
        known = profiles.delete_user(self.store, connection, user_id)
        if not known and not memberships:
            if missing_ok:
                return False
            raise not_found(f"user {user_id!r}")
        for audience_key in sorted({row.audience_key for row in memberships}):
            if types.get(audience_key) == "static":
                change_members(
                    self.store,
                    audience_key,
                    [
                        Member(user_id, row.tenant)
                        for row in memberships
                        if row.audience_key == audience_key
                    ],
                    "remove",
                    source="api",
                    connection=connection,
                )
        return True

    # -- guides and broadcasts --------------------------------------------------------------------

    def guide_eligibility(self, guide_key: str, user_id: str, tenant: str | None) -> dict:
        from audiences.workflows.guides import eligible, load_guide, profile_warehouse

        if not KEY_PATTERN.fullmatch(guide_key):
            raise not_found(f"guide {guide_key!r}")
        try:
            guide = load_guide(self.settings.guides_dir, guide_key)
        except ValueError:
            raise not_found(f"guide {guide_key!r}") from None
        with profile_warehouse(self.store, user_id) as warehouse:
            result = eligible(guide, user_id, tenant, self.store, warehouse, datetime.now(UTC))
        return {
            "guide_key": guide_key,
            "user_id": user_id,
            "tenant": tenant,
            "eligible": result.eligible,
            "reason": result.reason,
        }

    def broadcast(
        self,
        key: str,
        workflow: str,
        data: dict,
        tenant: str | None,
        sink: str | None,
        broadcast_id: str | None,
        claim: idempotency.Claim | None = None,
    ) -> dict:
        """Queue one delivery per member. A broadcast is idempotent by itself (its deliveries have
        deterministic ids), so its deliveries are written first and an idempotency key's answer
        is recorded after, in a transaction of its own."""
        from audiences.delivery.sinks import close_sinks, load_sinks
        from audiences.workflows.broadcasts import broadcast

        self.require_audience(key)
        check_json_values(data, "data")
        sinks, default_sink = load_sinks(self.settings.sinks_file)
        close_sinks(sinks)
        sink = sink or default_sink
        if sink not in sinks:
            raise invalid("sink", f"unknown sink {sink!r}; sinks: {', '.join(sorted(sinks))}")
        result = broadcast(self.store, key, workflow, sink, data, tenant, broadcast_id)
        answer = {
            "broadcast_id": result.broadcast_id,
            "recipients": result.recipients,
            "new_deliveries": result.new_deliveries,
        }
        return self.write(lambda _connection: answer, claim) if claim is not None else answer


def member_entry(row: dict) -> dict:
    """Knock's `AudienceMember`: the user as the store knows them (a "missing user" has only an id)."""
    known = row["properties"] is not None and row["deleted_at"] is None
    user = {
        **(json.loads(row["properties"]) if known else {}),
        "__typename": "User",
        "id": row["user_id"],
        "updated_at": row["updated_at"] if known else row["added_at"],
    }
    return {
        "__typename": "AudienceMember",
        "added_at": row["added_at"],
        "user_id": row["user_id"],
        "tenant": row["tenant"],
        "user": user,
    }


def encode_cursor(row: dict) -> str:
    text = json.dumps(
        [row["user_id"], row["tenant_key"]], ensure_ascii=False, separators=(",", ":")
    )
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, field_name: str) -> tuple[str, str]:
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        value = None
    if not (
        isinstance(value, list) and len(value) == 2 and all(isinstance(part, str) for part in value)
    ):
        raise invalid(field_name, "not a cursor this API returned")
    return storable_position(value[0], field_name), storable_position(value[1], field_name)


def check_properties(properties: dict, path: str = "") -> None:
    """User properties must be storable: JSON values only (`check_json_values`), valid Unicode, at
    most 256 kB (Knock's limit). `path` names where they are in the request ("" for a body)."""
    check_json_values(properties, path)
    field_name = path or "body"
    try:
        size = len(json.dumps(properties, ensure_ascii=False).encode("utf-8"))
    except UnicodeEncodeError:
        raise invalid(
            field_name, "contains text that is not valid Unicode (a lone surrogate)"
        ) from None
    if size > MAX_PROPERTIES_BYTES:
        raise invalid(
            field_name, f"properties take {size:,} bytes; the limit is {MAX_PROPERTIES_BYTES:,}"
        )


def check_json_values(value: object, path: str = "") -> None:
    """Refuse what JSON cannot carry, naming the field: `NaN` and `Infinity` (Python's parser reads
    them, but stored they would be invalid JSON for the warehouse and every reader), and nesting
    deeper than `MAX_NESTING` (which would exhaust the stack of the code that merges properties).
    Walked without recursion."""
    pending = [(value, path, 0)]
    while pending:
        item, where, depth = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise invalid(
                where or "body", f"{item} is not a number JSON can carry (no NaN or Infinity)"
            )
        if isinstance(item, dict):
            children = item.items()
        elif isinstance(item, list):
            children = enumerate(item)
        else:
            continue
        if depth >= MAX_NESTING:
            raise invalid(where or "body", f"nested more than {MAX_NESTING} levels deep")
        pending.extend(
            (child, f"{where}.{name}" if where else str(name), depth + 1)
            for name, child in reversed(list(children))
        )


def tenant_of(value: str | None) -> str | None:
    """A blank tenant means "no tenant" (Knock's rule for guides; we use it everywhere)."""
    return normalize_tenant(value)
