"""Promotion as a Dagster run: the `promote_definitions` job promotes commits to an environment
through `promote_now`, records each changed audience's impact (members now and after, entered,
exited, deliveries) as the run's metadata, and evaluates the target environment at once, in its
own run of its main job. `audiences promote` runs this job too (`run_promotion`), so every
promotion, from the UI or the CLI, is a run of it in the instance `dg dev` shows."""

import argparse
import contextlib

import dagster as dg
from pydantic import Field

from audiences.lifecycle.commands import PromotionReport, promote_now
from audiences.lifecycle.commits import LifecycleError
from audiences.settings import Settings
from pipelines.defs.resources import EnvironmentNames, SettingsParam

PROMOTION_JOB = "promote_definitions"


class PromotionConfig(dg.Config):
    """What to promote: as `audiences promote --to TO [--commit ID]`."""

    to: str = Field(description="the environment to promote to, e.g. production")
    commit: str | None = Field(
        default=None, description="only this commit id (default: every commit the target lacks)"
    )
    evaluate: bool = Field(
        default=True, description="evaluate the target environment at once (its main job)"
    )


@dg.op(
    description=(
        "Promote commits to the environment `to` (all it lacks, or one), after measuring their "
        "impact on its users; then evaluate it at once, in a run of its main job. The output's "
        "metadata holds each changed audience's members now and after, entered and exited, the "
        "deliveries they would cause, and the evaluation's own counts."
    ),
)
def promote_commits(
    context: dg.OpExecutionContext,
    config: PromotionConfig,
    settings: SettingsParam,
    promotion_report: dg.ResourceParam[PromotionReport | None],
) -> dg.Output[dict]:
    from audiences.lifecycle.impact import format_impact

    report = promotion_report or PromotionReport()

    def before(plan, result) -> None:
        context.log.info(
            f"promoting {len(plan.commits)} commits from {plan.source} to {plan.target}:\n"
            + "\n".join(format_impact(result))
        )
        if report.before is not None:
            report.before(plan, result)

    try:
        outcome = promote_now(
            settings,
            config.to,
            config.commit,
            evaluate=config.evaluate,
            arguments=report.arguments or argparse.Namespace(debug=False, verbose=False),
            instance=context.instance,
            before=before,
            promoted=report.promoted,
        )
    except LifecycleError as error:
        report.error = error  # refused, nothing written: the CLI says so in its own words
        raise
    report.outcome = outcome
    context.log.info(reload_code_locations(settings.for_environment(config.to), context.run_id))
    plan, result = outcome.plan, outcome.impact
    impact = {
        each.audience_key: {
            "change": each.change,
            "members_now": each.members_now,
            "members_after": each.members_after,
            "entered": each.entered,
            "exited": each.exited,
            "deliveries": each.deliveries,
            "would_hold": each.would_hold,
        }
        for each in result.audiences
    }
    rows = [
        "| audience | change | members now | after | entered | exited | deliveries |",
        "|---|---|---|---|---|---|---|",
    ]
    rows += [
        f"| {key} | {v['change']} | {v['members_now']} | {v['members_after']} | {v['entered']} "
        f"| {v['exited']} | {v['deliveries']} |"
        for key, v in impact.items()
    ]
    metadata = {
        "source": plan.source,
        "target": plan.target,
        "commits": [commit.commit_id for commit in plan.commits],
        "impact": dg.MetadataValue.json(impact),
        "impact_per_audience": dg.MetadataValue.md("\n".join(rows)),
        "entered": sum(v["entered"] for v in impact.values()),
        "exited": sum(v["exited"] for v in impact.values()),
    }
    if outcome.status is not None:
        target = settings.for_environment(config.to)
        changes = context.instance.get_latest_materialization_event(
            EnvironmentNames.of(target).key("membership_changes")
        )
        metadata["evaluated"] = outcome.status == 0
        if changes is not None:
            metadata["evaluation_run_id"] = changes.run_id
            found = changes.asset_materialization.metadata.get("changes")
            metadata["evaluation_changes"] = dg.MetadataValue.json(found.value if found else {})
        if outcome.status != 0:
            raise dg.Failure(
                f"promoted to {config.to}, but its evaluation failed: see the run of "
                f"{EnvironmentNames.of(target).name('audiences_job')}",
                metadata=metadata,
            )
    context.log.info(f"promoted {len(plan.commits)} commits from {plan.source} to {plan.target}")
    return dg.Output(
        {"target": plan.target, "commits": metadata["commits"], "impact": impact},
        metadata=metadata,
    )


@dg.job(
    name=PROMOTION_JOB,
    description=(
        "Promote definitions' commits to an environment (as `audiences promote`), with their "
        "impact on its users in the run's metadata, and evaluate that environment at once."
    ),
)
def promotion_job():
    promote_commits()


# The UI's own queries: whether it knows a run (so it shows this instance), and its "Reload all".
KNOWS_RUN = "query KnowsRun($runId: ID!) { runOrError(runId: $runId) { __typename } }"
RELOAD_WORKSPACE = """
mutation ReloadWorkspace {
  reloadWorkspace {
    __typename
    ... on PythonError { message }
  }
}
"""


def _graphql(url: str, query: str, variables: dict, timeout: float) -> dict:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read()).get("data") or {}


def reload_code_locations(settings: Settings, run_id: str, timeout: float = 300.0) -> str:
    """Ask the Dagster UI at `settings.dagster_url` to reload its code locations (GraphQL
    `reloadWorkspace`, its "Reload all" button), so that it shows what a promotion changed at
    once: a later environment's audience assets come from its dbt project, read when the code
    location loads. Only a UI of this run's instance (one that knows `run_id`) is reloaded.
    Returns what happened, as a line for the log; no UI running is not an error (the next
    `dg dev` loads the new definitions)."""
    url = settings.dagster_url
    if url is None:
        return "the Dagster UI was not reloaded (AUDIENCES_DAGSTER_URL=none)"
    try:
        known = _graphql(url, KNOWS_RUN, {"runId": run_id}, timeout=10)
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        return f"no Dagster UI at {url} to reload ({reason}): it shows the promotion once it loads"
    if (known.get("runOrError") or {}).get("__typename") != "Run":
        return f"the Dagster UI at {url} shows another Dagster instance: not reloaded"
    try:
        result = _graphql(url, RELOAD_WORKSPACE, {}, timeout=timeout).get("reloadWorkspace") or {}
    except (OSError, ValueError) as error:
        return f"the Dagster UI at {url} did not reload: {getattr(error, 'reason', error)}"
    if result.get("__typename") != "Workspace":
        return f"the Dagster UI at {url} could not reload: {result.get('message') or result}"
    return f"reloaded the code locations of the Dagster UI at {url}: it shows {settings.environment}'s new audiences"


def promotion_resources() -> dict[str, dg.ResourceDefinition]:
    """The promotion job's own resource in the code location: no report (a run from the UI is
    followed in the UI)."""
    return {
        "promotion_report": dg.ResourceDefinition.none_resource(
            description="`audiences promote`'s printer of the impact and outcome (none in the UI)"
        )
    }


def run_promotion(
    settings: Settings,
    to: str,
    commit: str | None,
    *,
    evaluate: bool,
    report: PromotionReport,
    instance: dg.DagsterInstance | None = None,
    launched_by: str = "audiences promote",
) -> dg.ExecuteInProcessResult:
    """Run the `promote_definitions` job in this process, in the instance `dg dev` shows
    (DAGSTER_HOME) unless one is given: what `audiences promote` does, so that its promotion is
    the same run, with the same metadata, as one launched from the UI. `report` sees the impact
    before anything is written, and receives the outcome (or the refusal). `launched_by` tags the
    run with its caller (the management API's promote passes `knock commit promote`)."""
    from audiences.settings import prepare_dagster_home

    verbose = bool(getattr(report.arguments, "verbose", False))
    opened = (
        contextlib.nullcontext(instance)
        if instance is not None
        else dg.DagsterInstance.from_config(str(prepare_dagster_home(settings.dagster_home)))
    )
    with opened as chosen:
        return promotion_job.execute_in_process(
            run_config={
                "ops": {
                    "promote_commits": {
                        "config": {"to": to, "commit": commit, "evaluate": evaluate}
                    }
                },
                "loggers": {
                    "console": {"config": {"log_level": "DEBUG" if verbose else "CRITICAL"}}
                },
            },
            instance=chosen,
            resources={"settings": settings, "promotion_report": report},
            raise_on_error=False,
            tags={"audiences/launched_by": launched_by},
        )
