"""Promotion as a Dagster run: the `promote_definitions` job promotes commits to an environment
(as `audiences promote` does, through the same `promote_now`), records each changed audience's
impact (members now and after, entered, exited, deliveries) as the run's metadata, and evaluates
the target environment at once, in its own run of its main job."""

import argparse

import dagster as dg
from pydantic import Field

from audiences.lifecycle.commands import promote_now
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
    )
)
def promote_commits(
    context: dg.OpExecutionContext, config: PromotionConfig, settings: SettingsParam
) -> dg.Output[dict]:
    from audiences.lifecycle.impact import format_impact

    def before(plan, result) -> None:
        context.log.info(
            f"promoting {len(plan.commits)} commits from {plan.source} to {plan.target}:\n"
            + "\n".join(format_impact(result))
        )

    outcome = promote_now(
        settings,
        config.to,
        config.commit,
        evaluate=config.evaluate,
        arguments=argparse.Namespace(debug=False, verbose=False),
        instance=context.instance,
        before=before,
    )
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
