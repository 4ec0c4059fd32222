"""Audience definitions as files, in the Knock CLI layout: `<folder>/<key>/audience.json`.

Definitions pulled with `knock audience pull` work unchanged. Loading parses every file and
compiles every condition (so a definition that validates is one that compiles); validation adds the
checks that need the whole set: unknown or cyclic audience references, and type changes of an
audience that already exists in the warehouse. Every problem names the file and the JSON path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from audiences.conditions.compiler import (
    Condition,
    ConditionError,
    audience_argument,
    attributes_used,
)

KEY_PATTERN = re.compile(r"[a-z0-9_-]{1,255}")
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
        return {
            audience_argument(condition)
            for segment in self.segments
            for condition in segment
            if condition.operator in ("is_audience_member", "is_not_audience_member")
        }


def model_name_for(key: str) -> str:
    return key.replace("-", "_")


def parse_definition(raw: object, key: str, file: Path) -> AudienceDefinition:
    """Parse one audience.json document; raise `DefinitionError` naming every problem in it."""
    where = str(file)
    problems: list[Problem] = []
    if not KEY_PATTERN.fullmatch(key):
        problems.append(Problem(where, "$", f"bad audience key {key!r}: use lower-case letters, digits, '-' and '_'"))
    if not isinstance(raw, dict):
        raise DefinitionError(problems + [Problem(where, "$", "an audience definition must be a JSON object")])
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(Problem(where, "$.name", "`name` must be a non-empty string"))
    audience_type = raw.get("type")
    if audience_type not in AUDIENCE_TYPES:
        problems.append(Problem(where, "$.type", f"`type` must be \"dynamic\" or \"static\", got {audience_type!r}"))
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        problems.append(Problem(where, "$.description", "`description` must be a string or null"))
    segments: list[tuple[Condition, ...]] = []
    raw_segments = raw.get("segments")
    if audience_type == "static" and raw_segments:
        problems.append(Problem(where, "$.segments", "a static audience has no segments (members are added to it)"))
    elif audience_type == "dynamic":
        if not isinstance(raw_segments, list):
            problems.append(Problem(where, "$.segments", "a dynamic audience needs a `segments` list"))
            raw_segments = []
        for s, raw_segment in enumerate(raw_segments):
            conditions = raw_segment.get("conditions") if isinstance(raw_segment, dict) else None
            if not isinstance(conditions, list):
                problems.append(Problem(where, f"$.segments[{s}]", "a segment is {\"conditions\": [...]}"))
                continue
            parsed = []
            for c, raw_condition in enumerate(conditions):
                location = f"$.segments[{s}].conditions[{c}]"
                try:
                    condition = Condition.from_json(raw_condition, location)
                    attributes_used([[condition]])  # compiling is the argument check
                    parsed.append(condition)
                except ConditionError as error:
                    problems.append(Problem(where, f"{location}.{error.field}", str(error)))
            segments.append(tuple(parsed))
    if problems:
        raise DefinitionError(problems)
    return AudienceDefinition(key, name, audience_type, description, tuple(segments), file, raw)


def load_definition_file(path: Path, key: str | None = None) -> AudienceDefinition:
    """Load one definition file; the key is its folder's name for an `audience.json` (Knock's CLI
    layout), else the file's name without `.json` (a draft such as `drafts/premium-users.json`)."""
    path = Path(path)
    key = key or (path.parent.name if path.name == DEFINITION_FILE else path.stem)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DefinitionError([Problem(str(path), "$", f"cannot read: {error.strerror}")]) from None
    except ValueError as error:
        raise DefinitionError([Problem(str(path), "$", f"not valid JSON: {error}")]) from None
    return parse_definition(raw, key, path)


def load_definitions(folder: Path) -> dict[str, AudienceDefinition]:
    """Every `<folder>/<key>/audience.json`, keyed by audience key; all problems raised together."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DefinitionError([Problem(str(folder), "$", "the definitions folder does not exist")])
    definitions: dict[str, AudienceDefinition] = {}
    problems: list[Problem] = []
    for file in sorted(folder.glob(f"*/{DEFINITION_FILE}")):
        try:
            definition = load_definition_file(file)
        except DefinitionError as error:
            problems.extend(error.problems)
            continue
        definitions[definition.key] = definition
    problems.extend(_model_name_collisions(definitions.values()))
    if problems:
        raise DefinitionError(problems)
    return definitions


def _model_name_collisions(definitions: Iterable[AudienceDefinition]) -> list[Problem]:
    seen: dict[str, AudienceDefinition] = {}
    problems = []
    for definition in definitions:
        other = seen.setdefault(definition.model_name, definition)
        if other is not definition:
            problems.append(
                Problem(str(definition.file), "$", f"key {definition.key!r} and {other.key!r} map to the same "
                        f"model name {definition.model_name!r}; rename one")
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
    known = set(definitions) | set(other_audiences)
    for definition in definitions.values():
        for s, segment in enumerate(definition.segments):
            for condition in segment:
                if condition.operator not in ("is_audience_member", "is_not_audience_member"):
                    continue
                if condition.argument not in known:
                    problems.append(Problem(str(definition.file), f"{condition.location}.argument",
                                            f"unknown audience {condition.argument!r}"))
    for cycle in _cycles(definitions):
        first = definitions[cycle[0]]
        problems.append(Problem(str(first.file), "$.segments",
                                "audience membership cycle: " + " -> ".join(cycle + [cycle[0]])))
    for key, previous in (existing_types or {}).items():
        definition = definitions.get(key)
        if definition is not None and definition.type != previous:
            problems.append(Problem(str(definition.file), "$.type",
                                    f"audience {key!r} is {previous}; types cannot be changed after creation "
                                    "(create a new audience with another key)"))
    return problems


def _cycles(definitions: dict[str, AudienceDefinition]) -> list[list[str]]:
    """Each reference cycle once, as the list of keys along it."""
    cycles, seen_cycles = [], set()
    state: dict[str, str] = {}

    def visit(key: str, trail: list[str]) -> None:
        state[key] = "active"
        for target in sorted(definitions[key].references()):
            if target not in definitions:
                continue
            if state.get(target) == "active":
                cycle = trail[trail.index(target):] if target in trail else [target]
                if frozenset(cycle) not in seen_cycles:
                    seen_cycles.add(frozenset(cycle))
                    cycles.append(cycle)
            elif target not in state:
                visit(target, trail + [target])
        state[key] = "done"

    for key in sorted(definitions):
        if key not in state:
            visit(key, [key])
    return cycles


def evaluation_order(definitions: dict[str, AudienceDefinition]) -> list[str]:
    """Keys with every referenced audience before the audiences that refer to it."""
    order: list[str] = []

    def place(key: str) -> None:
        if key in order or key not in definitions:
            return
        for target in sorted(definitions[key].references()):
            place(target)
        order.append(key)

    for key in sorted(definitions):
        place(key)
    return order
