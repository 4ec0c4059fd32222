"""The Dagster code location of the audiences engine. Domain logic lives in `audiences/`."""
