"""Transient failures are retried by Prefect; bad input is not (it would fail the same way)."""

from __future__ import annotations

import errno

import pytest
from prefect import flow, task

from fp8core.calibration import CalibrationDataError
from fp8core.graph import ModelError
from tasks.retry import IO_RETRIES, is_transient


@pytest.mark.parametrize("exc, transient", [
    (TimeoutError("nfs"), True),
    (ConnectionResetError("peer"), True),
    (OSError(errno.EIO, "I/O error"), True),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (FileNotFoundError("x"), False),
    (PermissionError("x"), False),
    (ModelError("bad model"), False),
    (CalibrationDataError("bad data"), False),
    (RuntimeError("bug"), False),
])
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_prefect_retries_a_transient_failure_and_not_a_user_error():
    calls = {"flaky": 0, "bad": 0}

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise TimeoutError("network filesystem timed out")
        return "ok"

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def bad():
        calls["bad"] += 1
        raise ModelError("input model 'x.onnx' does not exist")

    @flow
    def run():
        first = flaky()
        try:
            bad()
        except ModelError:
            pass
        return first

    assert run() == "ok"
    assert calls == {"flaky": 3, "bad": 1}
