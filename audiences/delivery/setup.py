"""The workflow side of the settings: triggers (validated against the audiences) and sinks."""

from __future__ import annotations

from dataclasses import dataclass

from audiences.conditions.definitions import DefinitionError, definition_keys
from audiences.dbt.models import custom_audience_keys
from audiences.settings import Settings
from audiences.workflows.triggers import WorkflowTrigger, load_triggers


@dataclass(frozen=True)
class WorkflowSetup:
    triggers: dict[str, WorkflowTrigger]
    sinks: dict
    default_sink: str


def load_workflow_setup(settings: Settings) -> WorkflowSetup:
    """Triggers from the workflows folder and sinks from the sinks file, checked against each other."""
    from audiences.delivery.sinks import load_sinks

    sinks, default_sink = load_sinks(settings.sinks_file)
    # A trigger on an audience skipped for errors in its definition stays: the audience still exists.
    # Its keys only: no definition is compiled (every one was, at 2,000 audiences: seconds of each
    # run's `audience_definitions` asset).
    audiences = definition_keys(settings.definitions_dir) | set(
        custom_audience_keys(settings.dbt_project_dir)
    )
    try:
        triggers = load_triggers(settings.workflows_dir, audiences, set(sinks))
    except DefinitionError:
        # An archived audience's triggers stop (`audiences archive`), but for the exits of its
        # last members (its `exited` triggers, once: it never moves again); in a later
        # environment a trigger on an audience not promoted there yet waits for it. Both are
        # known, so not an error, and left out. The store is asked only when a trigger names an
        # unknown audience.
        from audiences.store.commits import archived_in

        archived = archived_in(settings.store_url)
        inactive = set(archived)
        if settings.environment != settings.development_environment:
            inactive |= definition_keys(settings.working_definitions_dir) - audiences
        if not inactive:
            raise
        triggers = load_triggers(settings.workflows_dir, audiences | inactive, set(sinks))
        triggers = {
            key: t
            for key, t in triggers.items()
            if t.audience_key not in inactive or (t.audience_key in archived and t.on == "exited")
        }
    return WorkflowSetup(triggers, sinks, default_sink)
