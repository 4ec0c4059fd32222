"""Preparing the dbt project: generate the audience models, then parse only when something changed.

`generate` (the `audiences generate` and `audiences run` commands) writes the audience models from
the definitions, only the files that changed. Loading the code location never writes them: Dagster
cannot load dbt assets before a manifest exists, and every dbt command costs seconds to start, so
`prepare` checks that the models on disk are the ones the definitions generate (failing with "run
`audiences generate`" when they drift) and runs `dbt parse` only when the project's files differ
from those the manifest was parsed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from audiences.conditions.definitions import (
    DEFINITION_FILE,
    DefinitionSet,
    load_definition_set,
)
from audiences.dbt.models import (
    CUSTOM_FOLDER,
    GENERATED_FOLDERS,
    CompileCache,
    GeneratedFile,
    custom_audience_keys,
    definition_digest,
    drift,
    generate_models,
    generator_fingerprint,
    write_models,
)
from audiences.settings import ENGINE_DBT_PROJECT, ENGINE_DEFINITIONS, Settings, require_dbt_project

FINGERPRINT_FILE = "audiences_fingerprint.txt"
BUILD_STATE_FOLDER = "build_state"
BUILD_STATES_KEPT = 3
# The models on disk were generated from these definitions by this generator (target/, beside the
# manifest), and which audiences it skipped: a run whose definitions, generator and project files
# are unchanged compiles nothing, not even to check the definitions when the code location loads.
GENERATED_STAMP_FILE = "audiences_generated.json"
# Compiled audiences by content (`models.CompileCache`), written by `generate` only.
COMPILE_CACHE_FILE = "audiences_compiled.json"


def dbt_executable() -> str:
    candidate = Path(sys.executable).parent / "dbt"
    return str(candidate) if candidate.exists() else "dbt"


def _parts(path: Path) -> tuple[str, ...]:
    """Paths' own order (by their parts), without `Path.__lt__`'s cost per comparison."""
    return path.parts


def project_fingerprint(project_dir: Path) -> str:
    """A hash of every file dbt parses (models, macros, project and profile files)."""
    digest = hashlib.sha256()
    for folder in ("models", "macros", "tests"):
        for path in sorted((project_dir / folder).rglob("*"), key=_parts):
            if path.is_file():
                digest.update(str(path.relative_to(project_dir)).encode())
                digest.update(path.read_bytes())
    for name in ("dbt_project.yml", "profiles.yml"):
        digest.update((project_dir / name).read_bytes())
    return digest.hexdigest()


def generation_fingerprint(settings: Settings, project: str | None = None) -> str:
    """A hash of what the generated models depend on: the definitions folder's files, the
    generator (`models.generator_fingerprint`: its source and templates, SQLGlot's version, the
    dialect) and every file of the dbt project (hand-written SQL audiences included).
    Reading the files costs milliseconds; compiling the definitions again, seconds. `project`:
    the dbt project's `project_fingerprint`, if already computed."""
    digest = hashlib.sha256((project or project_fingerprint(settings.dbt_project_dir)).encode())
    digest.update(settings.definitions_dir.name.encode())
    digest.update(generator_fingerprint().encode())
    folder = settings.definitions_dir
    digest.update(b"\0" + str(folder).encode())
    if folder.is_dir():
        for path in sorted(folder.rglob("*"), key=_parts):
            if path.is_file() and path.suffix in (".json", ".py", ".sql"):
                digest.update(str(path.relative_to(folder)).encode() + b"\0")
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _stamp(settings: Settings) -> Path:
    return settings.dbt_project_dir / "target" / GENERATED_STAMP_FILE


def _current_stamp(settings: Settings, fingerprint: str | None = None) -> dict | None:
    """The stamp of the last generation (or check) when the models on disk were generated, or
    checked, from what is there now (`fingerprint`, computed if not given); else None."""
    try:
        stamp = json.loads(_stamp(settings).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("fingerprint") != (
        fingerprint or generation_fingerprint(settings)
    ):
        return None
    return stamp


def _models_are_current(settings: Settings, fingerprint: str | None = None) -> bool:
    """Whether the models on disk were generated, or checked, from what is there now."""
    return _current_stamp(settings, fingerprint) is not None


def _record_models_current(
    settings: Settings, definitions: DefinitionSet, fingerprint: str | None = None
) -> None:
    """Stamp the models on disk as generated from what is there now. `fingerprint`: the one
    computed before the models were written, when writing them did not change it (a
    generation that wrote files changed the project's part of it: computed again then)."""
    stamp = _stamp(settings)
    stamp.parent.mkdir(exist_ok=True)
    stamp.write_text(
        json.dumps(
            {
                "fingerprint": fingerprint or generation_fingerprint(settings),
                # what could not be used then; every other definition compiled
                "skipped": sorted(definitions.skipped),
            }
        )
    )


def _compile_cache_file(settings: Settings) -> Path:
    return settings.dbt_project_dir / "target" / COMPILE_CACHE_FILE


def load_compile_cache(settings: Settings) -> CompileCache:
    """The compiled audiences `generate` kept (`models.CompileCache`); empty when there are none
    or they were compiled by another generator. Reads only."""
    try:
        return CompileCache.from_json(_compile_cache_file(settings).read_text(encoding="utf-8"))
    except OSError:
        return CompileCache()


def _save_compile_cache(
    settings: Settings, cache: CompileCache, definitions: DefinitionSet
) -> None:
    """Keep the entries this generation used, and which files compiled (every definition it
    evaluates, and those skipped only for what they refer to), written beside, then renamed."""
    compiled = []
    for definition in definitions.definitions.values():
        if definition.file.name != DEFINITION_FILE:
            continue
        try:
            text = definition.file.read_bytes()
            # the text compiled, not one written since (that one is checked when next read)
            if json.loads(text.decode("utf-8-sig")) == definition.raw:
                compiled.append(definition_digest(text))
        except (OSError, ValueError):
            continue
    known = load_compile_cache(settings)
    if not cache.changed and set(compiled) == known.compiled_files:
        return
    target = _compile_cache_file(settings)
    target.parent.mkdir(exist_ok=True)
    scratch = target.with_name(f".{target.name}.{os.getpid()}")
    scratch.write_text(cache.to_json(compiled), encoding="utf-8")
    scratch.replace(target)


def project_definitions(settings: Settings, fingerprint: str | None = None) -> DefinitionSet:
    """The definitions folder as a run uses it: the audiences to evaluate, and those skipped
    because their definitions have errors (hand-written SQL audiences count as known keys).

    A definition file this generator compiled before, with the same text (the compile cache
    `generate` keeps, or the stamp of generated models that are current), is not compiled again
    (at 2,000 audiences that was seconds of every code location load); the others are, to check
    them and name their problems. `fingerprint`: `generation_fingerprint`, if already computed."""
    stamp = _current_stamp(settings, fingerprint)
    skipped = None if stamp is None else set(stamp.get("skipped", ()))
    compiled_files = load_compile_cache(settings).compiled_files

    def known_to_compile(key: str) -> bool:
        if skipped is not None and key not in skipped:
            return True
        if not compiled_files:
            return False
        try:
            text = (settings.definitions_dir / key / DEFINITION_FILE).read_bytes()
        except OSError:
            return False
        return definition_digest(text) in compiled_files

    return load_definition_set(
        settings.definitions_dir,
        custom_audience_keys(settings.dbt_project_dir),
        known_to_compile=known_to_compile,
    )


class ModelsOutOfDate(ValueError):
    """The dbt project's generated models are not the ones the definitions generate."""


def generated_files(
    settings: Settings, definitions: DefinitionSet, cache: CompileCache | None = None
) -> list[GeneratedFile]:
    """The generated files the definitions call for in the settings' dbt project; `cache`
    (by default the one `generate` kept, read only) spares compiling what compiled before."""
    return generate_models(
        definitions.definitions,
        settings.dbt_project_dir,
        source_label=settings.definitions_dir.name,
        skipped=definitions.skipped,
        cache=cache if cache is not None else load_compile_cache(settings),
    )


def generate(settings: Settings, definitions: DefinitionSet | None = None) -> list[Path]:
    """Regenerate audience models from the definitions folder; returns the files that changed.

    An audience whose definition has errors (or refers to one that has) gets no model; its last
    members are kept as they were (see `generate_models`), and the others are generated as usual.
    """
    require_dbt_project(settings.dbt_project_dir)
    fingerprint = generation_fingerprint(settings)  # once: reading every file costs ~1 s at 2,000
    if _models_are_current(settings, fingerprint):
        return []
    definitions = definitions or project_definitions(settings, fingerprint)
    cache = load_compile_cache(settings)
    files = generated_files(settings, definitions, cache)
    if (
        _is_engine_project(settings.dbt_project_dir)
        and not _is_engine_project(settings.definitions_dir, ENGINE_DEFINITIONS)
        and drift(files, settings.dbt_project_dir)
    ):
        raise ValueError(
            f"{settings.dbt_project_dir} is the engine's own dbt project, generated from its sample definitions; "
            f"the models of {settings.definitions_dir} go in a project of your own: run `audiences init <folder>` "
            f"and run from that folder"
        )
    changed = write_models(files, settings.dbt_project_dir)
    _save_compile_cache(settings, cache, definitions)
    # Files written change the project's part of the fingerprint: computed again only then.
    _record_models_current(settings, definitions, None if changed else fingerprint)
    return changed


def _is_engine_project(folder: Path, engine: Path = ENGINE_DBT_PROJECT) -> bool:
    return folder.resolve() == engine.resolve()


# What `audiences init` leaves out of the engine's dbt project: dbt's own output, and the sample's
# models (generated ones are written again from the project's definitions; the hand-written
# sample audience would join every user's results).
_NOT_SCAFFOLDED = ("target", "logs", "dbt_packages", ".user.yml")


def scaffold_dbt_project(target: Path) -> list[Path]:
    """Copy the engine's dbt project to `target` without the sample's audiences: the staging,
    intermediate and mart models and macros every project shares, and an empty folder for
    hand-written SQL audiences. The generated models are left for `generate`. Returns the files
    written; an existing `target` is refused."""
    if target.exists():
        raise FileExistsError(f"{target}: already exists")
    generated = {
        ENGINE_DBT_PROJECT / file.path for file in generate_models({}, ENGINE_DBT_PROJECT, "")
    }
    left_out = {ENGINE_DBT_PROJECT / folder for folder in (*GENERATED_FOLDERS, CUSTOM_FOLDER)}

    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder)
        return {
            name
            for name in names
            if name in _NOT_SCAFFOLDED or here / name in generated or here / name in left_out
        }

    shutil.copytree(ENGINE_DBT_PROJECT, target, ignore=ignore)
    custom = target / CUSTOM_FOLDER
    custom.mkdir(parents=True)
    (custom / "_custom_audiences.yml").write_text(CUSTOM_AUDIENCES_YAML, encoding="utf-8")
    return sorted(path for path in target.rglob("*") if path.is_file())


CUSTOM_AUDIENCES_YAML = """\
version: 2

# Hand-written SQL audiences: each models/audiences/custom/<key>.sql is the audience <key>, for what
# conditions cannot express (an aggregate across users, a join with another table). Each returns the
# membership contract every audience model returns, so that audience_members can union them all:
#
#   - name: high_value_accounts
#     config:
#       contract: {enforced: true}
#     columns:
#       - {name: user_key, data_type: integer}
#       - {name: user_id, data_type: varchar}
#       - {name: tenant, data_type: varchar}
#
# Then run `audiences generate`, and the audience joins the catalog and audience_members.
models: []
"""


def check_generated(
    settings: Settings, definitions: DefinitionSet | None = None, fingerprint: str | None = None
) -> DefinitionSet | None:
    """Fail with `ModelsOutOfDate` when the generated models on disk differ from what the
    definitions generate (missing, different or stale files). Reads only; skipped when the
    definitions, the generator and the project are those the models were last generated or
    checked from (`generation_fingerprint`, given as `fingerprint` if already computed). Returns
    the definitions it checked (None if skipped)."""
    require_dbt_project(settings.dbt_project_dir)
    fingerprint = fingerprint or generation_fingerprint(settings)
    if _models_are_current(settings, fingerprint):
        return None
    definitions = definitions or project_definitions(settings, fingerprint)
    problems = drift(generated_files(settings, definitions), settings.dbt_project_dir)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ModelsOutOfDate(
            f"{settings.dbt_project_dir}: the generated models differ from the definitions in "
            f"{settings.definitions_dir}: {problems[0]}{more}; run `audiences generate`"
        )
    return definitions


def prepare(settings: Settings, definitions: DefinitionSet | None = None) -> Path:
    """Make sure `target/manifest.json` matches the project's models; returns the manifest.

    Called when the code location loads: it never writes the models (`ModelsOutOfDate` says to run
    `audiences generate` when they drift from the definitions), and runs `dbt parse` (which writes
    only dbt's `target/`) when the project changed since the manifest was parsed."""
    project_dir = settings.dbt_project_dir
    fingerprint = project_fingerprint(project_dir)
    generated = generation_fingerprint(settings, fingerprint)
    if not _models_are_current(settings, generated):
        checked = check_generated(settings, definitions, generated)
        if checked is not None:
            _record_models_current(settings, checked, generated)
    manifest = project_dir / "target" / "manifest.json"
    fingerprint_file = project_dir / "target" / FINGERPRINT_FILE
    if (
        manifest.exists()
        and fingerprint_file.exists()
        and fingerprint_file.read_text() == fingerprint
    ):
        return manifest
    run_dbt(["parse"], settings)
    fingerprint_file.write_text(fingerprint)
    return manifest


def build_state(project_dir: Path, fingerprint: str | None) -> Path | None:
    """The folder holding the manifest a warehouse was last fully built from (its project's
    fingerprint), for dbt's `--state`: a run after a definitions change rebuilds only the audience
    views whose nodes changed (`state:unmodified` ones are left as they are). None when not kept."""
    if fingerprint is None:
        return None
    folder = project_dir / "target" / BUILD_STATE_FOLDER / fingerprint
    return folder if (folder / "manifest.json").exists() else None


def keep_build_state(project_dir: Path, fingerprint: str) -> None:
    """Keep `target/manifest.json` as the state of a build from `fingerprint`, when it is that
    project's manifest (the newest `BUILD_STATES_KEPT` states are kept)."""
    target = project_dir / "target"
    parsed = target / FINGERPRINT_FILE
    if (
        not parsed.exists()
        or parsed.read_text() != fingerprint
        or build_state(project_dir, fingerprint)
    ):
        return
    states = target / BUILD_STATE_FOLDER
    # Copied beside, then renamed into place: a killed run leaves no half-written state.
    scratch = states / f".{fingerprint}.{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(target / "manifest.json", scratch / "manifest.json")
    try:
        scratch.rename(states / fingerprint)
    except OSError:  # another run kept the same state first
        shutil.rmtree(scratch, ignore_errors=True)
    kept = sorted(
        (folder for folder in states.iterdir() if not folder.name.startswith(".")),
        key=lambda folder: folder.stat().st_mtime,
        reverse=True,
    )
    for folder in kept[BUILD_STATES_KEPT:]:
        shutil.rmtree(folder, ignore_errors=True)


def run_dbt(arguments: list[str], settings: Settings) -> None:
    """Run one dbt command against the project with the engine's settings in its environment, in
    this process (`audiences.dbt.runner`: dbt is imported once, not by a new Python per command).
    A failed command raises with dbt's own messages."""
    from audiences.dbt.runner import run_dbt_here

    project = str(settings.dbt_project_dir)
    code, events, error = run_dbt_here(
        [*arguments, "--project-dir", project, "--profiles-dir", project],
        {**os.environ, **settings.environment_variables()},
        Path.cwd(),
    )
    if code != 0:
        messages = [
            event["info"]["msg"] for event in events if event["info"]["level"] in ("warn", "error")
        ]
        reason = "\n".join(messages[-20:]) or (str(error) if error else f"exit code {code}")
        raise RuntimeError(f"`dbt {' '.join(arguments)}` failed:\n{reason[-4000:]}")
