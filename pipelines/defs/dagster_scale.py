"""Dagster's handling of a multi-asset's outputs, made linear in their number (issue 25).

Dagster 1.x (`AssetsDefinition.asset_and_check_keys`) builds the set of every key of a
multi-asset anew each time it is asked, and its step execution asks once per output of the step
for each output yielded (`StepExecutionContext.get_output_asset_keys`): cubic in the outputs.
The dbt assets yield one output per audience, so at 2,000 audiences a Dagster run spent tens of
minutes there after dbt had finished (`bench/analysis.md`). An `AssetsDefinition` never changes its
keys (a subset is a new one), so the set is computed once per definition.

The same step execution also asks, for each output yielded, which asset keys the step's outputs
are (`StepExecutionContext.get_output_asset_keys`), looking up every output: quadratic, 4 million
look-ups at 2,000 audiences. A step's outputs and its selection are fixed when it starts, so the
answer is computed once per step.

And for each asset it materializes, the step records the data versions of the asset's parents (its
provenance), reading each parent's latest materialization from the event log one by one: a parent
materialized earlier in the same step is read again after it was (its cached version is dropped
then). `audience_members` reads every audience, so its materialization made 2,000 queries of the
event log at 2,000 audiences, each for one key. The parents not known yet are read together
(Dagster's own lookup of several keys, 100 per query), at the same moment as one by one: the same
records.
"""

from functools import cached_property

from dagster._core.definitions.assets.definition.assets_definition import AssetsDefinition
from dagster._core.execution.context.system import StepExecutionContext
from dagster._core.execution.plan import execute_step


def cache_asset_and_check_keys() -> None:
    """Compute `AssetsDefinition.asset_and_check_keys` once per definition, and a step's output
    asset keys once per step (frozensets: no caller may change them), and the parents of an asset
    a step materializes read together. Idempotent; called when the code location's assets are
    built."""
    _cache_output_asset_keys()
    _read_parents_together()
    current = AssetsDefinition.__dict__["asset_and_check_keys"]
    if isinstance(current, cached_property):
        return
    compute = current.fget

    def asset_and_check_keys(self: AssetsDefinition) -> frozenset:
        return frozenset(compute(self))

    cached = cached_property(asset_and_check_keys)
    cached.__set_name__(AssetsDefinition, "asset_and_check_keys")
    AssetsDefinition.asset_and_check_keys = cached


def _cache_output_asset_keys() -> None:
    current = StepExecutionContext.__dict__["get_output_asset_keys"]
    if getattr(current, "cached_per_step", False):
        return

    def get_output_asset_keys(self: StepExecutionContext) -> frozenset:
        keys = self.__dict__.get("_audiences_output_asset_keys")
        if keys is None:
            keys = self.__dict__["_audiences_output_asset_keys"] = frozenset(current(self))
        return keys

    get_output_asset_keys.cached_per_step = True
    get_output_asset_keys.__doc__ = current.__doc__
    StepExecutionContext.get_output_asset_keys = get_output_asset_keys


def _read_parents_together() -> None:
    current = execute_step._get_input_provenance_data
    if getattr(current, "reads_parents_together", False):
        return

    def _get_input_provenance_data(asset_key, step_context: StepExecutionContext):
        cache = step_context._data_version_cache
        parents = step_context.job_def.asset_layer.get(asset_key).parent_keys
        unknown = [key for key in parents if key not in cache.input_asset_version_info]
        if len(unknown) > 1:
            cache._fetch_input_asset_version_info(unknown)
        return current(asset_key, step_context)

    _get_input_provenance_data.reads_parents_together = True
    _get_input_provenance_data.__doc__ = current.__doc__
    execute_step._get_input_provenance_data = _get_input_provenance_data
