"""Issue 25: a Dagster run's cost per output of a multi-asset does not grow with their number."""

import dagster as dg
from dagster._core.definitions.assets.definition.assets_definition import AssetsDefinition

from pipelines.defs.dagster_scale import cache_asset_and_check_keys

OUTPUTS = 300


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

    @dg.multi_asset(
        specs=[dg.AssetSpec(f"a{index}") for index in range(OUTPUTS)],
        can_subset=True,
    )
    def many(context: dg.AssetExecutionContext):
        for key in sorted(context.selected_asset_keys, key=str):
            yield dg.MaterializeResult(asset_key=key)

    result = dg.materialize([many])
    assert result.success
    assert len(result.get_asset_materialization_events()) == OUTPUTS
    assert listed < 10 * OUTPUTS, listed
