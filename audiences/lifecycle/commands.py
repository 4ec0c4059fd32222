"""The lifecycle's commands: `commit`, `commits`, `diff`, `promote` and `archive`.

Each is a handler `(settings, arguments) -> exit status` that the CLI registers with `register`;
the logic lives in `commits.py` and `impact.py`, shared with the management API.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from audiences.lifecycle import commits as lifecycle
from audiences.lifecycle.impact import Impact, format_impact, impact
from audiences.settings import Settings


def commit(settings: Settings, arguments) -> int:
    """Commit the working definitions' changes: one commit per changed audience (its full
    definition, content hash, author, time and the message), stored in the environment's store.
    The whole definitions folder must pass `validate`, and no audience may change type. Commits
    are made in the first environment (development); committing in a later one edits it directly
    and needs --force. With --dry-run, nothing is written: it prints what would be committed and
    its impact on the environment's members (--json for CI)."""
    environment = settings.environment
    if arguments.dry_run:
        changes = [
            change
            for change in lifecycle.uncommitted_changes(settings, environment)
            if change.kind != "deleted"
        ]
        result = impact(
            settings,
            environment,
            {change.key: change.previous for change in changes},
            {change.key: change.definition for change in changes},
        )
        if arguments.json:
            print(
                json.dumps(
                    {"commits": [c.key for c in changes], "impact": result.as_json()}, indent=2
                )
            )
        else:
            print(
                f"would commit {len(changes)} audiences in {environment} (dry run: nothing written)"
            )
            print("\n".join(format_impact(result)))
        return 0
    made = lifecycle.commit_changes(
        settings,
        arguments.message or "",
        environment=environment,
        force=arguments.force,
        keys=set(arguments.audience) if arguments.audience else None,
    )
    if arguments.json:
        print(json.dumps([_commit_json(commit) for commit in made], indent=2))
        return 0
    print(f"committed {len(made)} audiences in {environment}: {made[0].message!r}")
    for each in made:
        print(f"  {each.commit_id}  {each.audience_key}  (version {each.version})")
    return 0


def commits(settings: Settings, arguments) -> int:
    """List the commits that reached the environment, newest first (one per audience and change),
    with the later environments each has been promoted to."""
    environment = settings.environment
    store = lifecycle.open_store(settings, environment)
    try:
        found = lifecycle.commits_in(store, arguments.audience)
    finally:
        store.dispose()
    reached = {}
    for name in settings.environments:
        other = lifecycle.open_store(settings, name)
        try:
            reached[name] = {
                commit.commit_id for commit in lifecycle.commits_in(other, arguments.audience)
            }
        finally:
            other.dispose()
    rows = [
        {
            **_commit_json(commit),
            "environments": [
                name for name in settings.environments if commit.commit_id in reached[name]
            ],
        }
        for commit in reversed(found)
    ]
    if arguments.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no commits in {environment}")
    for row in rows:
        print(
            f"{row['id']}  {row['created_at']}  {row['audience_key']:<24} {row['action']:<8} "
            f"{row['author']:<12} {', '.join(row['environments'])}  {row['message']}"
        )
    return 0


def diff(settings: Settings, arguments) -> int:
    """Show the uncommitted changes: each audience whose working file differs from the
    environment's latest commit, as a diff of its JSON. Exit status 0 either way."""
    changes = lifecycle.uncommitted_changes(settings, settings.environment)
    if arguments.json:
        print(json.dumps([change.__dict__ for change in changes], indent=2))
        return 0
    if not changes:
        print(
            f"no uncommitted changes in {settings.working_definitions_dir} ({settings.environment})"
        )
        return 0
    for change in changes:
        note = " (archive it with `audiences archive`)" if change.kind == "deleted" else ""
        print(f"{change.kind}: {change.key}{note}")
        before = _pretty(change.previous)
        after = _pretty(change.definition)
        sys.stdout.writelines(
            difflib.unified_diff(
                before, after, f"{settings.environment}/{change.key}", f"working/{change.key}"
            )
        )
    return 0


def promote(settings: Settings, arguments) -> int:
    """Promote commits to the next environment (--to), in order: all the commits of the
    environment before it that it lacks, or only --commit ID. The target then evaluates at once,
    so users who newly match enter (and trigger `entered` workflows) and those who no longer match
    exit; a new audience backfills nothing. With --dry-run nothing is written: it prints, per
    changed audience, against the target's current users, the members now and after, who would
    enter and exit, the deliveries per workflow, and any change the circuit breaker would hold
    (--json for CI)."""
    if arguments.dry_run:
        plan = lifecycle.plan_promotion(settings, arguments.to, arguments.commit)
        result = planned_impact(settings, plan)
        if arguments.json:
            print(json.dumps(promotion_summary(plan, result), indent=2))
        else:
            print(
                f"would promote {len(plan.commits)} commits from {plan.source} to {plan.target} "
                f"(dry run: nothing written)"
            )
            print("\n".join(format_impact(result)))
        return 0

    def report(plan, result) -> None:
        # The impact first: a change the breaker would hold is flagged before it happens.
        if not arguments.json:
            print("\n".join(format_impact(result)))

    def promoted(plan) -> None:
        if not arguments.json:
            print(f"promoted {len(plan.commits)} commits from {plan.source} to {plan.target}")

    from pipelines.defs.lifecycle import run_promotion

    # Refusals (an unknown environment or commit) before any run is made.
    lifecycle.plan_promotion(settings, arguments.to, arguments.commit)
    # A run of the `promote_definitions` job, as from the UI: the one way to promote.
    tracked = PromotionReport(report, promoted, arguments)
    result = run_promotion(
        settings,
        arguments.to,
        arguments.commit,
        evaluate=not arguments.no_evaluate,
        report=tracked,
    )
    if tracked.error is not None:
        raise tracked.error
    outcome = tracked.outcome
    if outcome is None:
        for event in result.get_step_failure_events():
            error = event.step_failure_data.error
            if getattr(arguments, "debug", False) and error is not None:
                sys.stderr.write(error.to_string())
            message = error.message.strip() if error is not None else "the promotion failed"
            print(f"error: {message}", file=sys.stderr)
        print(
            f"the promotion failed: see run {result.run_id} of promote_definitions", file=sys.stderr
        )
        return 1
    if arguments.json:
        summary = promotion_summary(outcome.plan, outcome.impact)
        print(json.dumps({**summary, "evaluated": not arguments.no_evaluate}, indent=2))
    return outcome.status or 0


@dataclass
class PromotionReport:
    """How a caller of the `promote_definitions` job (`audiences promote`) follows it: `before`
    sees the plan and its impact before anything is written, `promoted` the plan once the commits
    are in the target; the job leaves the outcome, or the refusal, here. `arguments`: the CLI's
    (--verbose, --debug) for the target's evaluation."""

    before: Callable[[lifecycle.Promotion, Impact], None] | None = None
    promoted: Callable[[lifecycle.Promotion], object] | None = None
    arguments: object = None
    outcome: PromotionOutcome | None = None
    error: Exception | None = None


@dataclass
class PromotionOutcome:
    """What `promote_now` did: the promotion, its impact measured before it, and the exit status
    of the target's evaluation (None when it was not evaluated)."""

    plan: lifecycle.Promotion
    impact: Impact
    status: int | None


def planned_impact(settings: Settings, plan: lifecycle.Promotion) -> Impact:
    """The impact of a planned promotion on the target's current users, per changed audience."""
    changed = {key: plan.after[key] for key in plan.changed}
    return impact(settings, plan.target, {key: plan.before.get(key) for key in changed}, changed)


def promotion_summary(plan: lifecycle.Promotion, result: Impact) -> dict:
    return {
        "source": plan.source,
        "target": plan.target,
        "commits": [commit.commit_id for commit in plan.commits],
        "impact": result.as_json(),
    }


def promote_now(
    settings: Settings,
    to: str,
    commit_id: str | None = None,
    *,
    evaluate: bool = True,
    arguments=None,
    instance=None,
    before: Callable[[lifecycle.Promotion, Impact], None] | None = None,
    promoted: Callable[[lifecycle.Promotion], object] | None = None,
) -> PromotionOutcome:
    """Promote, the one way: the op of the `promote_definitions` job calls this (from the UI, and
    from `audiences promote`, which runs that job). Plan it, measure its impact on the target's
    users (`before` sees both before anything is written), promote, and evaluate the target at
    once through its main job, in a run tagged with the promotion's commits and impact (in
    `instance`, the promotion run's, else the DAGSTER_HOME one)."""
    plan = lifecycle.plan_promotion(settings, to, commit_id)
    result = planned_impact(settings, plan)
    if before is not None:
        before(plan, result)
    lifecycle.promote(settings, to, commit_id)
    if promoted is not None:
        promoted(plan)
    status = None
    if evaluate:
        tags = {
            "audiences/promotion": f"{plan.source} -> {plan.target}",
            "audiences/commits": ", ".join(commit.commit_id for commit in plan.commits)[:2000],
            "audiences/impact": "; ".join(
                f"{a.audience_key} +{a.entered} -{a.exited}" for a in result.audiences
            )[:2000],
        }
        status = _evaluate(settings.for_environment(to), arguments, tags, instance)
    return PromotionOutcome(plan, result, status)


def _evaluate(settings: Settings, arguments, tags: dict[str, str], instance=None) -> int:
    """Evaluate the environment now, as `audiences run` does; the Dagster run carries the
    promotion's commits and impact as tags, so the UI links it to the promotion's run."""
    from audiences.cli.runs import run

    given = vars(arguments) if arguments is not None else {"debug": False}
    run_arguments = argparse.Namespace(
        **{
            **given,
            "allow_earlier": False,
            "verbose": given.get("verbose", False),
            "run_tags": tags,
            "instance": instance,
        }
    )
    print(f"evaluating {settings.environment}:", flush=True)
    return run(settings, run_arguments)


def archive(settings: Settings, arguments) -> int:
    """Archive an audience in every environment (as Knock does): an archive commit in each
    environment's store, its working folder removed. It is no longer evaluated anywhere, so its
    workflow triggers stop."""
    made = lifecycle.archive(settings, arguments.key, arguments.message)
    print(
        f"archived {arguments.key} in {', '.join(settings.environments)} (commit {made.commit_id})"
    )
    return 0


def _commit_json(commit: lifecycle.Commit) -> dict:
    return {
        "id": commit.commit_id,
        "audience_key": commit.audience_key,
        "action": commit.action,
        "version": commit.version,
        "content_hash": commit.content_hash,
        "author": commit.author,
        "message": commit.message,
        "created_at": commit.created_at,
        "environment": commit.environment,
        "definition": commit.definition,
    }


def _pretty(document: dict | None) -> list[str]:
    if document is None:
        return []
    return [line + "\n" for line in json.dumps(document, indent=2, sort_keys=True).splitlines()]


def register(command) -> None:
    """Add the lifecycle's commands to the CLI; `command(name, handler, help)` makes a subparser
    that takes the global options."""
    sub = command("commit", commit, "commit the working definitions' changes")
    sub.add_argument("-m", "--message", help="the commit message")
    sub.add_argument("--audience", action="append", help="only this audience (repeatable)")
    sub.add_argument("--force", action="store_true", help="commit in a later environment directly")
    sub.add_argument("--dry-run", action="store_true", help="show the impact, write nothing")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = command("commits", commits, "list the definitions' commits")
    sub.add_argument("--audience", help="only this audience's commits")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = command("diff", diff, "show the uncommitted changes to definitions")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = command("promote", promote, "promote commits to the next environment")
    sub.add_argument("--to", required=True, help="the environment to promote to")
    sub.add_argument("--commit", help="only this commit id")
    sub.add_argument("--dry-run", action="store_true", help="show the impact, write nothing")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.add_argument(
        "--no-evaluate", action="store_true", help="do not evaluate the target environment now"
    )
    sub = command("archive", archive, "archive an audience in every environment")
    sub.add_argument("key", help="the audience key")
    sub.add_argument("-m", "--message", help="the commit message")
