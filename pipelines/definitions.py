"""The code location's entry point (`dg dev`, `dagster dev`): loads `pipelines/defs/`, nothing else."""

from pipelines import build_definitions

defs = build_definitions()
