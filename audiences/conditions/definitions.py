"""Audience definitions as files, in the Knock CLI layout: `<folder>/<key>/audience.json`.

Definitions pulled with `knock audience pull` work unchanged. Loading parses every file and
compiles every condition (so a definition that validates is one that compiles); validation adds the
checks that need the whole set: unknown or cyclic audience references, and type changes of an
audience that already exists in the warehouse. Every problem names the file and the JSON path.

`load_definitions` refuses a folder with any problem (for `generate --check`); a run uses
`load_definition_set`, where a definition with errors, and every audience that refers to it, is
skipped while the others are evaluated (dbt's way with a broken model).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from audiences.conditions.compiler import (
    EXTENSION_OPERATORS,
    KEY_PATTERN,
    RECIPIENT,
    Attribute,
    Condition,
    ConditionError,
    attributes_used,
    audience_argument,
)

AUDIENCE_TYPES = ("dynamic", "static")
DEFINITION_FILE = "audience.json"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a definition: where (file, JSON path) and what."""

    file: str
    json_path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.json_path}: {self.message}"


class DefinitionError(ValueError):
    """Definitions that cannot be used; `problems` lists every one found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


@dataclass(frozen=True)
class AudienceDefinition:
    key: str
    name: str
    type: str
    description: str | None
    segments: tuple[tuple[Condition, ...], ...]
    file: Path
    raw: dict = field(compare=False, repr=False)
    # "per_tenant": evaluated once per (user, tenant) pair the user belongs to (our field; Knock's
    # CLI keeps it untouched). None: once per user, with no tenant.
    tenancy: str | None = None

    @property
    def per_tenant(self) -> bool:
        """Whether members are (user, tenant) pairs and conditions may read `tenant.*` and
        `membership.*`."""
        return self.tenancy == PER_TENANT

    @property
    def version(self) -> str:
        """A short content hash of the definition: the definition's version."""
        canonical = json.dumps(self.raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def model_name(self) -> str:
        """The dbt model (and relation) that holds this audience's members."""
        return model_name_for(self.key)

    def references(self) -> set[str]:
        """Keys of the audiences this one's conditions refer to."""
        return audiences_referred_to(self.segments)


def audiences_referred_to(segments: Iterable[Iterable[Condition]]) -> set[str]:
    """Keys of the audiences these conditions (an audience's or a workflow trigger's) refer to."""
    return {
        audience_argument(condition)
        for segment in segments
        for condition in segment
        if condition.operator in ("is_audience_member", "is_not_audience_member")
    }


def knock_incompatibilities(definition: AudienceDefinition) -> list[Problem]:
    """A problem for each condition Knock cannot hold (our extensions, such as event conditions):
    the definition is valid here, but cannot be pushed to Knock as it is."""
    return [
        Problem(
            str(definition.file),
            f"{condition.location}.operator",
            f"`{condition.operator}` is an extension of this engine (event conditions); "
            "Knock's audiences cannot hold it, so this audience cannot be pushed to Knock",
        )
        for segment in definition.segments
        for condition in segment
        if condition.operator in EXTENSION_OPERATORS
    ]


def model_name_for(key: str) -> str:
    return key.replace("-", "_")


PER_TENANT = "per_tenant"


def parse_definition(
    raw: object, key: str, file: Path, compile_conditions: bool = True
) -> AudienceDefinition:
    """Parse one audience.json document; raise `DefinitionError` naming every problem in it.

    Each condition is compiled once, as the check of its argument; `compile_conditions=False`
    leaves that out, for a document known to compile with this compiler (see
    `load_definition_set`'s `known_to_compile`)."""
    where = str(file)
    problems: list[Problem] = []
    if not KEY_PATTERN.fullmatch(key):
        problems.append(
            Problem(
                where, "$", f"bad audience key {key!r}: use lower-case letters, digits, '-' and '_'"
            )
        )
    if not isinstance(raw, dict):
        raise DefinitionError(
            [*problems, Problem(where, "$", "an audience definition must be a JSON object")]
        )
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(Problem(where, "$.name", "`name` must be a non-empty string"))
    audience_type = raw.get("type")
    if audience_type not in AUDIENCE_TYPES:
        problems.append(
            Problem(where, "$.type", f'`type` must be "dynamic" or "static", got {audience_type!r}')
        )
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        problems.append(Problem(where, "$.description", "`description` must be a string or null"))
    tenancy = raw.get("tenancy")
    if tenancy not in (None, PER_TENANT):
        problems.append(
            Problem(
                where, "$.tenancy", f'`tenancy` must be "{PER_TENANT}" or absent, got {tenancy!r}'
            )
        )
    elif tenancy == PER_TENANT and audience_type == "static":
        problems.append(
            Problem(
                where,
                "$.tenancy",
                "a static audience has no tenancy: its members carry their tenants",
            )
        )
    segments: list[tuple[Condition, ...]] = []
    raw_segments = raw.get("segments")
    if audience_type == "static" and raw_segments:
        problems.append(
            Problem(
                where, "$.segments", "a static audience has no segments (members are added to it)"
            )
        )
    elif audience_type == "dynamic":
        if not isinstance(raw_segments, list):
            problems.append(
                Problem(where, "$.segments", "a dynamic audience needs a `segments` list")
            )
            raw_segments = []
        for s, raw_segment in enumerate(raw_segments):
            conditions = raw_segment.get("conditions") if isinstance(raw_segment, dict) else None
            if not isinstance(conditions, list):
                problems.append(
                    Problem(where, f"$.segments[{s}]", 'a segment is {"conditions": [...]}')
                )
                continue
            parsed = []
            for c, raw_condition in enumerate(conditions):
                location = f"$.segments[{s}].conditions[{c}]"
                try:
                    condition = Condition.from_json(raw_condition, location)
                    if compile_conditions:
                        attributes_used([[condition]])  # compiling is the argument check
                    if condition.scope != RECIPIENT and tenancy != PER_TENANT:
                        raise ConditionError(
                            f"`{condition.property_name}` reads the {condition.scope}: only an "
                            f'audience with "tenancy": "{PER_TENANT}" is evaluated per tenant',
                            field="property",
                        )
                    parsed.append(condition)
                except ConditionError as error:
                    problems.append(Problem(where, f"{location}.{error.field}", str(error)))
            segments.append(tuple(parsed))
    if problems:
        raise DefinitionError(problems)
    return AudienceDefinition(
        key, name, audience_type, description, tuple(segments), file, raw, tenancy
    )


def load_definition_file(
    path: Path, key: str | None = None, compile_conditions: bool = True
) -> AudienceDefinition:
    """Load one definition file; the key is its folder's name for an `audience.json` (Knock's CLI
    layout), else the file's name without `.json` (a draft such as `drafts/premium-users.json`).
    `compile_conditions`: see `parse_definition`."""
    path = Path(path)
    key = key or (path.parent.name if path.name == DEFINITION_FILE else path.stem)
    try:
        text = _read_utf8(path)
    except OSError as error:
        raise DefinitionError([Problem(str(path), "$", f"cannot read: {error.strerror}")]) from None
    return _parse_text(text, key, str(path), compile_conditions)


@functools.lru_cache(maxsize=8192)
def _parse_text(
    text: str, key: str, path: str, compile_conditions: bool = True
) -> AudienceDefinition:
    """One file's parsed definition, kept per (text, key, path): a run reads the folder several
    times (its checks, models, triggers and catalog), and parsing compiles every condition. The
    definition is immutable and depends on nothing else; a file that cannot be used raises every
    time, as it is not kept."""
    try:
        raw = json.loads(text)
    except ValueError as error:
        raise DefinitionError([Problem(path, "$", f"not valid JSON: {error}")]) from None
    return parse_definition(raw, key, Path(path), compile_conditions)


def _read_utf8(path: Path) -> str:
    """The file's text, which must be UTF-8 (a byte-order mark is allowed). Anything else raises
    `DefinitionError` naming the line and column of the first byte that is not UTF-8."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DefinitionError(
            [
                Problem(
                    str(path),
                    "$",
                    "the file is UTF-16 (it starts with a UTF-16 byte-order "
                    "mark); audience definitions must be saved as UTF-8",
                )
            ]
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DefinitionError(
            [
                Problem(
                    str(path),
                    "$",
                    f"line {line}, column {column}: byte 0x{data[error.start]:02x} is not UTF-8; "
                    "audience definitions must be saved as UTF-8 (was it saved as Latin-1 or Windows-1252?)",
                )
            ]
        ) from None


def load_definitions(folder: Path) -> dict[str, AudienceDefinition]:
    """Every `<folder>/<key>/audience.json`, keyed by audience key; all problems raised together."""
    loaded = _load_files(folder)
    problems = [problem for key in sorted(loaded.broken) for problem in loaded.broken[key]]
    problems += [problem for _, problem in _model_name_collisions(loaded.definitions.values())]
    problems += [problem for _, problem in _column_collisions(loaded.definitions.values())]
    if problems:
        raise DefinitionError(problems)
    return loaded.definitions


def declared_type(path: Path) -> str | None:
    """The `type` a definition file declares, read even when the file has errors (None when it
    cannot be read or declares no known type)."""
    try:
        declared = json.loads(Path(path).read_bytes()).get("type")
    except (OSError, ValueError, AttributeError):
        return None
    return declared if declared in ("dynamic", "static") else None


def definition_keys(folder: Path) -> set[str]:
    """Every audience key the folder defines, evaluated or skipped (`DefinitionSet.keys`): its
    `<key>/audience.json` files, read and compiled by none (a trigger check needs only the keys)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DefinitionError([Problem(str(folder), "$", "the definitions folder does not exist")])
    return {file.parent.name for file in folder.glob(f"*/{DEFINITION_FILE}")}


@dataclass
class _LoadedFiles:
    definitions: dict[str, AudienceDefinition]
    broken: dict[str, list[Problem]]  # key (its folder's name) -> why its file cannot be used


def _load_files(
    folder: Path, known_to_compile: Callable[[str], bool] | None = None
) -> _LoadedFiles:
    folder = Path(folder)
    if not folder.is_dir():
        raise DefinitionError([Problem(str(folder), "$", "the definitions folder does not exist")])
    loaded = _LoadedFiles({}, {})
    for file in sorted(folder.glob(f"*/{DEFINITION_FILE}")):
        try:
            definition = load_definition_file(
                file,
                compile_conditions=known_to_compile is None
                or not known_to_compile(file.parent.name),
            )
        except DefinitionError as error:
            loaded.broken[file.parent.name] = list(error.problems)
            continue
        loaded.definitions[definition.key] = definition
    return loaded


@dataclass(frozen=True)
class DefinitionSet:
    """The definitions folder, split the way a run uses it: the audiences that can be evaluated,
    and those skipped, with why. An audience is skipped when its file cannot be used (not UTF-8 or
    not JSON, an unknown operator, a bad argument, a reference to no audience, a cycle, a model
    name another key also maps to), or when it refers, directly or not, to a skipped audience. A
    skipped audience is not evaluated: its last members stay as they were, and it has no events.
    """

    definitions: dict[str, AudienceDefinition]
    skipped: dict[str, list[Problem]]  # audience key -> why it is skipped
    problems: list[Problem]  # what is wrong in the files, each once (what `validate` lists)
    folder: str = ""

    @property
    def reasons(self) -> list[Problem]:
        """Why audiences are skipped, each once: the problems in the files first, then each
        audience skipped because it refers to a skipped one."""
        return list(
            dict.fromkeys(
                self.problems + [problem for found in self.skipped.values() for problem in found]
            )
        )

    @property
    def keys(self) -> set[str]:
        """Every audience the folder defines, evaluated or skipped."""
        return set(self.definitions) | set(self.skipped)

    def require(self, key: str) -> AudienceDefinition:
        """The definition of `key`; a `DefinitionError` if it is skipped (saying why) or unknown."""
        if key in self.skipped:
            raise DefinitionError(self.skipped[key])
        if key not in self.definitions:
            raise DefinitionError([Problem(self.folder, "$", f"no audience {key!r}")])
        return self.definitions[key]


# The operators whose argument is another audience's key.
_MEMBERSHIP_OPERATORS = ("is_audience_member", "is_not_audience_member")


def load_definition_set(
    folder: Path,
    other_audiences: Iterable[str] = (),
    known_to_compile: Callable[[str], bool] | None = None,
) -> DefinitionSet:
    """Every definition in `folder`, those that can be evaluated apart from those that cannot (see
    `DefinitionSet`). Only a missing folder raises: one broken file never hides the others.
    `other_audiences` are keys defined elsewhere (hand-written SQL audiences).

    `known_to_compile(key)` says that `<key>/audience.json` is a file this compiler compiled
    without error (`dbt.project` knows it of every file the generated models were made from): its
    conditions are not compiled again. Every other check runs as usual."""
    loaded = _load_files(folder, known_to_compile)
    problems = [problem for key in sorted(loaded.broken) for problem in loaded.broken[key]]
    skipped: dict[str, list[Problem]] = {key: list(found) for key, found in loaded.broken.items()}
    definitions = dict(loaded.definitions)
    cross = (
        _model_name_collisions(definitions.values(), other_audiences)
        + _column_collisions(definitions.values())
    ) + _set_problems(definitions, set(other_audiences) | set(loaded.broken))
    for key, problem in cross:
        if problem not in problems:
            problems.append(problem)
        skipped.setdefault(key, [])
        if problem not in skipped[key]:
            skipped[key].append(problem)
    for key in skipped:
        definitions.pop(key, None)
    # Then every audience that refers to a skipped one, one step of references at a time until
    # none is left (its reasons: the audiences skipped before that step). Only the audiences that
    # refer to those skipped in the step before are checked again: a chain of thousands costs its
    # length, not its square.
    referrers: dict[str, set[str]] = {}
    for key, definition in definitions.items():
        for segment in definition.segments:
            for condition in segment:
                if condition.operator in _MEMBERSHIP_OPERATORS and isinstance(
                    condition.argument, str
                ):
                    referrers.setdefault(condition.argument, set()).add(key)
    gone = set(skipped)
    step = set(skipped)
    while step:
        candidates = {key for s in step for key in referrers.get(s, ()) if key in definitions}
        dependents = {
            key: found
            for key in candidates
            if (found := references_to_skipped(definitions[key], gone))
        }
        for key, reasons in dependents.items():
            skipped[key] = reasons
            del definitions[key]
        gone |= dependents.keys()
        step = set(dependents)
    return DefinitionSet(definitions, dict(sorted(skipped.items())), problems, str(folder))


def references_to_skipped(definition: AudienceDefinition, skipped: Iterable[str]) -> list[Problem]:
    """A problem for each condition of `definition` that refers to one of the `skipped` audiences."""
    skipped = skipped if isinstance(skipped, set | frozenset) else set(skipped)
    return [
        Problem(
            str(definition.file),
            f"{condition.location}.argument",
            f"refers to audience {condition.argument!r}, which is skipped (its definition has errors)",
        )
        for segment in definition.segments
        for condition in segment
        if condition.operator in _MEMBERSHIP_OPERATORS and condition.argument in skipped
    ]


# Models (and their state tables) of the engine's dbt project: no audience's model may take their name.
ENGINE_MODEL_NAMES = frozenset(
    {
        "stg_warehouse__users",
        "int_users_flattened",
        "int_users_flattened__covered",
        "int_users_to_reevaluate",
        "audience_catalog",
        "audience_evaluations",
        "audience_members",
        "audience_members__state",
        "audience_members__reevaluated",
        "audience_members__per_user",
        "static_audience_members",
        "users_to_reevaluate",
        "users_to_reevaluate_in_time",
        "pairs_to_reevaluate",
        "pair_rows_to_reevaluate",
    }
)
# An audience's model file is `<model name>.sql`, and file systems allow 255 bytes in a name.
MODEL_NAME_BYTES = 255 - len(".sql")


def _model_name_collisions(
    definitions: Iterable[AudienceDefinition], other_audiences: Iterable[str] = ()
) -> list[tuple[str, Problem]]:
    """(key, problem) for each definition whose model name (the dbt model, the relation and the
    file name) is another's: keys that differ only by case or punctuation (`a-b`, `a_b`; DuckDB's
    names and some file systems ignore case), a hand-written SQL audience's (`other_audiences`), one
    of the engine's models, or too long for a file name. Both definitions of a pair are unusable."""
    seen: dict[str, AudienceDefinition] = {}
    custom = {model_name_for(key).casefold(): key for key in sorted(other_audiences)}
    problems = []
    for definition in sorted(definitions, key=lambda d: d.key):
        name = definition.model_name
        folded = name.casefold()
        if folded in ENGINE_MODEL_NAMES:
            message = (
                f"key {definition.key!r} maps to the model name {name!r}, which the engine's dbt "
                "project uses; rename the audience"
            )
        elif folded in custom:
            message = (
                f"key {definition.key!r} maps to the model name {name!r} of the hand-written SQL "
                f"audience models/audiences/custom/{custom[folded]}.sql; rename one"
            )
        elif len(name.encode()) > MODEL_NAME_BYTES:
            message = (
                f"key {definition.key!r} is {len(name.encode())} bytes long: its model file "
                f"{name[:20]}....sql would exceed the 255-byte file name limit (at most "
                f"{MODEL_NAME_BYTES})"
            )
        else:
            other = seen.setdefault(folded, definition)
            if other is not definition:
                problem = Problem(
                    str(definition.file),
                    "$",
                    f"key {definition.key!r} and {other.key!r} map to the same "
                    f"model name {other.model_name!r}; rename one",
                )
                problems += [(definition.key, problem), (other.key, problem)]
            continue
        problems.append((definition.key, Problem(str(definition.file), "$", message)))
    return problems


def _column_collisions(definitions: Iterable[AudienceDefinition]) -> list[tuple[str, Problem]]:
    """(key, problem) for each definition that reads a property whose columns in
    `int_users_flattened` (`property_slug`) would be another property's: two hashed stems whose
    10-digit hashes clash (snake_case stems are distinct by construction). Every definition reading
    either property is unusable."""
    readers: dict[tuple[str, tuple[str, ...]], list[tuple[AudienceDefinition, str]]] = {}
    for definition in sorted(definitions, key=lambda d: d.key):
        for segment in definition.segments:
            for condition in segment:
                if condition.path:
                    readers.setdefault((condition.scope, condition.path), []).append(
                        (definition, condition.location)
                    )
    by_stem: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for scope, path in sorted(readers):
        stem = Attribute(path, "", scope).column_name.removesuffix("__")
        by_stem.setdefault(stem.casefold(), []).append((scope, path))
    problems = []
    for stem, paths in sorted(by_stem.items()):
        if len(paths) < 2:
            continue
        names = " and ".join(repr(f"{scope}." + ".".join(path)) for scope, path in paths)
        for pair in paths:
            for definition, location in readers[pair]:
                message = f"the properties {names} map to the same columns ({stem}__*); rename one"
                problems.append(
                    (definition.key, Problem(str(definition.file), location or "$", message))
                )
    return problems


def validate_definitions(
    definitions: dict[str, AudienceDefinition],
    other_audiences: Iterable[str] = (),
    existing_types: dict[str, str] | None = None,
) -> list[Problem]:
    """Checks across the set: unknown references, cycles, and type changes of existing audiences.

    `other_audiences` are keys defined elsewhere (hand-written SQL audiences); `existing_types` are
    the types the warehouse has already recorded (types are immutable, Knock's rule).
    """
    problems: list[Problem] = []
    for _, problem in _set_problems(definitions, other_audiences, existing_types):
        if problem not in problems:  # a cycle is one problem of each audience along it
            problems.append(problem)
    return problems


def problems_of(
    key: str, definitions: dict[str, AudienceDefinition], other_audiences: Iterable[str] = ()
) -> list[Problem]:
    """The problems across the set (`validate_definitions`') that make audience `key` unusable:
    its references to no audience, and a cycle it is on."""
    return [problem for of, problem in _set_problems(definitions, other_audiences) if of == key]


def _set_problems(
    definitions: dict[str, AudienceDefinition],
    other_audiences: Iterable[str] = (),
    existing_types: dict[str, str] | None = None,
) -> list[tuple[str, Problem]]:
    """`validate_definitions`' problems, each with the key of every audience it makes unusable."""
    problems: list[tuple[str, Problem]] = []
    known = set(definitions) | set(other_audiences)
    for definition in definitions.values():
        for segment in definition.segments:
            for condition in segment:
                if condition.operator not in ("is_audience_member", "is_not_audience_member"):
                    continue
                if condition.argument not in known:
                    problems.append(
                        (
                            definition.key,
                            Problem(
                                str(definition.file),
                                f"{condition.location}.argument",
                                f"unknown audience {condition.argument!r}",
                            ),
                        )
                    )
    for cycle in _cycles(definitions):
        first = definitions[cycle[0]]
        problem = Problem(
            str(first.file),
            "$.segments",
            "audience membership cycle: " + " -> ".join([*cycle, cycle[0]]),
        )
        problems += [(key, problem) for key in cycle]
    for key, previous in (existing_types or {}).items():
        definition = definitions.get(key)
        if definition is not None and definition.type != previous:
            problems.append(
                (
                    key,
                    Problem(
                        str(definition.file),
                        "$.type",
                        f"audience {key!r} is {previous}; types cannot be changed after creation "
                        "(create a new audience with another key)",
                    ),
                )
            )
    return problems


def _cycles(definitions: dict[str, AudienceDefinition]) -> list[list[str]]:
    """Each reference cycle once, as the list of keys along it.

    A depth-first walk with its own stack, not Python's: a chain of thousands of audiences is a
    valid workspace (or a cycle to name), never a RecursionError.
    """
    cycles, seen_cycles = [], set()
    state: dict[str, str] = {}
    for root in sorted(definitions):
        if root in state:
            continue
        state[root] = "active"
        trail = [root]
        stack = [iter(sorted(definitions[root].references()))]
        while stack:
            target = next(stack[-1], None)
            if target is None:
                stack.pop()
                state[trail.pop()] = "done"
                continue
            if target not in definitions:
                continue
            if state.get(target) == "active":
                cycle = trail[trail.index(target) :]
                if frozenset(cycle) not in seen_cycles:
                    seen_cycles.add(frozenset(cycle))
                    cycles.append(cycle)
            elif target not in state:
                state[target] = "active"
                trail.append(target)
                stack.append(iter(sorted(definitions[target].references())))
    return cycles


def evaluation_order(definitions: dict[str, AudienceDefinition]) -> list[str]:
    """Keys with every referenced audience before the audiences that refer to it.

    Iterative (any depth of references), and linear: each key is placed once.
    """
    order: list[str] = []
    placed: set[str] = set()
    for root in sorted(definitions):
        if root in placed:
            continue
        placed.add(root)
        stack = [(root, iter(sorted(definitions[root].references())))]
        while stack:
            key, targets = stack[-1]
            target = next(targets, None)
            if target is None:
                stack.pop()
                order.append(key)
            elif target in definitions and target not in placed:
                placed.add(target)
                stack.append((target, iter(sorted(definitions[target].references()))))
    return order
