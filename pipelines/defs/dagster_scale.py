"""Dagster's handling of a multi-asset's outputs, made linear in their number (issue 25).

Dagster 1.x (`AssetsDefinition.asset_and_check_keys`) builds the set of every key of a
multi-asset anew each time it is asked, and its step execution asks once per output of the step
for each output yielded (`StepExecutionContext.get_output_asset_keys`): cubic in the outputs.
The dbt assets yield one output per audience, so at 2,000 audiences a Dagster run spent tens of
minutes there after dbt had finished (`bench/analysis.md`). An `AssetsDefinition` never changes its
keys (a subset is a new one), so the set is computed once per definition.
"""

from functools import cached_property

from dagster._core.definitions.assets.definition.assets_definition import AssetsDefinition


def cache_asset_and_check_keys() -> None:
    """Compute `AssetsDefinition.asset_and_check_keys` once per definition (a frozenset: no
    caller may change it). Idempotent; called when the code location's assets are built."""
    current = AssetsDefinition.__dict__["asset_and_check_keys"]
    if isinstance(current, cached_property):
        return
    compute = current.fget

    def asset_and_check_keys(self: AssetsDefinition) -> frozenset:
        return frozenset(compute(self))

    cached = cached_property(asset_and_check_keys)
    cached.__set_name__(AssetsDefinition, "asset_and_check_keys")
    AssetsDefinition.asset_and_check_keys = cached
