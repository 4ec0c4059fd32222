"""Preparing the dbt project: generate the audience models, then parse only when something changed.

Dagster cannot load dbt assets before a manifest exists, and every dbt command costs seconds to
start, so `prepare` regenerates models from the definitions (writing only files that changed) and
runs `dbt parse` only when the project's files differ from those the manifest was parsed from.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from audiences.dbt_models import generate_models, write_models
from audiences.definitions import load_definitions
from audiences.settings import Settings, require_dbt_project

FINGERPRINT_FILE = "audiences_fingerprint.txt"


def dbt_executable() -> str:
    candidate = Path(sys.executable).parent / "dbt"
    return str(candidate) if candidate.exists() else "dbt"


def project_fingerprint(project_dir: Path) -> str:
    """A hash of every file dbt parses (models, macros, project and profile files)."""
    digest = hashlib.sha256()
    for folder in ("models", "macros", "tests"):
        for path in sorted((project_dir / folder).rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(project_dir)).encode())
                digest.update(path.read_bytes())
    for name in ("dbt_project.yml", "profiles.yml"):
        digest.update((project_dir / name).read_bytes())
    return digest.hexdigest()


def generate(settings: Settings) -> list[Path]:
    """Regenerate audience models from the definitions folder; returns the files that changed."""
    require_dbt_project(settings.dbt_project_dir)
    definitions = load_definitions(settings.definitions_dir)
    files = generate_models(definitions, settings.dbt_project_dir, source_label=settings.definitions_dir.name)
    return write_models(files, settings.dbt_project_dir)


def prepare(settings: Settings) -> Path:
    """Generate models and make sure `target/manifest.json` matches them; returns the manifest."""
    generate(settings)
    project_dir = settings.dbt_project_dir
    manifest = project_dir / "target" / "manifest.json"
    fingerprint_file = project_dir / "target" / FINGERPRINT_FILE
    fingerprint = project_fingerprint(project_dir)
    if manifest.exists() and fingerprint_file.exists() and fingerprint_file.read_text() == fingerprint:
        return manifest
    run_dbt(["parse"], settings)
    fingerprint_file.write_text(fingerprint)
    return manifest


def run_dbt(arguments: list[str], settings: Settings) -> subprocess.CompletedProcess:
    """Run one dbt command against the project with the engine's settings in its environment."""
    environment = {**os.environ, **settings.environment_variables()}
    command = [dbt_executable(), *arguments, "--project-dir", str(settings.dbt_project_dir),
               "--profiles-dir", str(settings.dbt_project_dir)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`dbt {' '.join(arguments)}` failed:\n{result.stdout[-4000:]}{result.stderr[-2000:]}")
    return result
