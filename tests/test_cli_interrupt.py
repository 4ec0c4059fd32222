"""A run stopped by SIGTERM or Ctrl-C says so in one line (and `run` exits 130), from the error
Dagster records for the interrupted step."""

from __future__ import annotations

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError

from audiences.cli.runs import INTERRUPTED, _step_error_message


def _failure_of(error: BaseException):
    @dg.op
    def step():
        raise error

    @dg.job
    def job():
        step()

    result = job.execute_in_process(raise_on_error=False, instance=dg.DagsterInstance.ephemeral())
    (event,) = result.get_step_failure_events()
    return event.step_failure_data.error


def test_an_interrupted_step_is_named_as_interrupted():
    # Dagster's signal handler raises this, with no message, in the step SIGTERM interrupts (seen
    # as `error: IndexError: list index out of range` when a run was stopped while delivering).
    assert _step_error_message(_failure_of(DagsterExecutionInterruptedError())) == INTERRUPTED


def test_a_step_error_without_a_message_names_its_class():
    message = _step_error_message(_failure_of(LookupError()))
    assert message.startswith("LookupError: ") and "unexpected" in message
