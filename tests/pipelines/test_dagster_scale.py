"""Issue 25: a Dagster run's cost per output of a multi-asset does not grow with their number."""

import dagster as dg
import pytest
from dagster._core.definitions.assets.definition.assets_definition import AssetsDefinition

from pipelines.defs.dagster_scale import cache_asset_and_check_keys

OUTPUTS = 300
STEP_OUTPUTS = 100


def materialize_outputs(count: int) -> None:
    """One step of a multi-asset with `count` outputs, each yielded, materialized in process."""

    @dg.multi_asset(
        specs=[dg.AssetSpec(f"a{index}") for index in range(count)],
        can_subset=True,
    )
    def many(context: dg.AssetExecutionContext):
        for key in sorted(context.selected_asset_keys, key=str):
            yield dg.MaterializeResult(asset_key=key)

    result = dg.materialize([many])
    assert result.success
    assert len(result.get_asset_materialization_events()) == count


def test_a_multi_assets_keys_are_listed_once_per_run_not_once_per_output_per_output(monkeypatch):
    """The dbt assets yield one output per audience; Dagster listed every key of the multi-asset
    once per output of the step for each output yielded (cubic: tens of minutes at 2,000
    audiences). Counted here through the check keys that each listing reads."""
    cache_asset_and_check_keys()  # what loading the code location does
    listed = 0
    check_keys = AssetsDefinition.check_keys

    def counted(self):
        nonlocal listed
        listed += 1
        return check_keys.fget(self)

    monkeypatch.setattr(AssetsDefinition, "check_keys", property(counted))

    materialize_outputs(OUTPUTS)
    assert listed < 10 * OUTPUTS, listed


def test_a_steps_output_asset_keys_are_looked_up_once_per_step(monkeypatch):
    """For each output yielded, Dagster looked up the asset key of every output of the step
    (`get_output_asset_keys`): quadratic, 4 million look-ups at 2,000 audiences, most of a Dagster
    run's own time after dbt. Counted here through the look-ups (quadratic: 100 outputs show it)."""
    from dagster._core.definitions.assets.job.asset_layer import AssetLayer

    cache_asset_and_check_keys()  # what loading the code location does
    looked_up = 0
    look_up = AssetLayer.get_asset_key_for_node_output

    def counted(self, *args, **kwargs):
        nonlocal looked_up
        looked_up += 1
        return look_up(self, *args, **kwargs)

    monkeypatch.setattr(AssetLayer, "get_asset_key_for_node_output", counted)

    materialize_outputs(STEP_OUTPUTS)
    assert looked_up < 10 * STEP_OUTPUTS, looked_up


def test_each_dbt_nodes_asset_spec_is_made_once():
    """dagster-dbt resolves a node's dependencies through the translator, so without a memo the
    engine's translator made an audience's spec again for every model that reads it
    (`audience_members` reads them all): at 2,000 audiences, seconds of every code location load."""
    from collections import Counter

    from audiences.settings import Settings
    from pipelines.defs.audiences import AudiencesTranslator, audience_models

    made = Counter()
    unprefixed = AudiencesTranslator._unprefixed_spec

    def counted(self, manifest, unique_id, project):
        made[unique_id] += 1
        return unprefixed(self, manifest, unique_id, project)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AudiencesTranslator, "_unprefixed_spec", counted)
        assets, _ = audience_models(Settings.from_env())
    assert len(assets.keys) > 20
    assert made and max(made.values()) == 1, made.most_common(3)


def test_the_parents_of_an_asset_are_read_together_when_it_is_materialized(monkeypatch):
    """For each asset a step materializes, Dagster reads its parents' latest materializations (the
    data versions it records as provenance), one query per parent materialized earlier in the
    step: `audience_members`, which reads every audience, made 2,000 queries of the event log at
    2,000 audiences. The unknown parents are now read in one lookup (100 keys per query)."""
    from dagster._core.instance import DagsterInstance

    cache_asset_and_check_keys()  # what loading the code location does
    views = [dg.AssetSpec(f"view{index}") for index in range(STEP_OUTPUTS)]
    members = dg.AssetSpec("members", deps=[spec.key for spec in views])

    @dg.multi_asset(specs=[*views, members], can_subset=True)
    def evaluation(context: dg.AssetExecutionContext):
        for spec in views:  # dependency order, as dagster-dbt yields them
            yield dg.MaterializeResult(asset_key=spec.key)
        yield dg.MaterializeResult(asset_key=members.key)

    queries = 0
    get_asset_records = DagsterInstance.get_asset_records

    def counted(self, *args, **kwargs):
        nonlocal queries
        queries += 1
        return get_asset_records(self, *args, **kwargs)

    monkeypatch.setattr(DagsterInstance, "get_asset_records", counted)
    with DagsterInstance.ephemeral() as instance:
        result = dg.materialize([evaluation], instance=instance)
        assert result.success
        record = instance.get_latest_materialization_event(members.key)
    # The provenance is recorded as before: every parent's materialization in this run.
    tags = record.dagster_event.step_materialization_data.materialization.tags
    pointers = [tag for tag in tags if tag.startswith("dagster/input_event_pointer/")]
    assert len(pointers) == STEP_OUTPUTS
    assert queries < 10, queries
