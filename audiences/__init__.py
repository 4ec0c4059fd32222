"""A self-hosted, warehouse-native audiences engine, compatible with Knock's Audiences.

This package holds the domain logic (condition compiler, audience definitions, user loading,
warehouse queries, command-line tool) with no Dagster imports, so the CLI, the Dagster code
location in `pipelines/` and tests all share it.
"""
