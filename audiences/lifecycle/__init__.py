"""The lifecycle of audience definitions: environments, commits and promotion, as in Knock.

The working files (`data/audiences/`, or wherever `--definitions` points) are the first
environment's uncommitted changes. `commit` records every changed audience's full definition in
that environment's store; `promote` copies commits to the next environment's store, which then
evaluates only what was promoted to it. The stores are the record: an environment's definitions
folder and dbt project after the first are written from its store, never edited by hand.
"""
