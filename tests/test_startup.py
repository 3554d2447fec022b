"""The CLI's early start of Prefect's temporary server (flows/startup.py), with the real server."""

from __future__ import annotations

import os
import socket

import pytest

from flows import startup


def _settings_url():
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


@pytest.fixture
def clean_startup():
    startup.stop_prefect_server()
    yield
    startup.stop_prefect_server()


def test_the_flow_process_uses_the_server_it_launched_and_stops_it(clean_startup):
    from prefect import flow

    assert _settings_url() is None
    startup.start_prefect_server_early()
    server = startup._server
    assert server is not None and server.poll() is None
    startup.use_prefect_server()
    url = _settings_url()
    assert url == f"http://127.0.0.1:{startup._port}/api" and os.environ["PREFECT_API_URL"] == url
    assert startup._answers(url)

    @flow
    def tiny() -> int:
        return 7

    assert tiny() == 7  # ran through that server: Prefect started no other one
    startup.start_prefect_server_early()  # a second CLI run in the same process reuses it
    assert startup._server is server

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    assert APILogWorker._instances  # the flow's logs went through a worker bound to that server
    startup.stop_prefect_server()
    assert server.poll() is not None
    assert _settings_url() is None and "PREFECT_API_URL" not in os.environ
    # drained and gone before the server: a worker left bound to the dead URL retried it at
    # interpreter exit (the full test run hung 18 minutes after its last test)
    assert not APILogWorker._instances and not EventsWorker._instances


def test_a_taken_port_is_retried_on_another(clean_startup, monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    free = startup._free_port
    monkeypatch.setattr(startup, "_free_port", lambda: next(ports, None) or free())
    try:
        startup.start_prefect_server_early()
        first = startup._server
        startup.use_prefect_server()
        assert first.poll() is not None  # the first launch could not bind its port and exited
        assert startup._port != taken.getsockname()[1] and startup._answers(_settings_url())
    finally:
        taken.close()


def test_a_configured_api_url_launches_nothing(clean_startup, monkeypatch):
    from prefect.context import refresh_global_settings_context

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    refresh_global_settings_context()
    try:
        startup.start_prefect_server_early()
        assert startup._server is None
        startup.use_prefect_server()
        assert _settings_url() == "http://127.0.0.1:9/api"
    finally:
        monkeypatch.delenv("PREFECT_API_URL")
        refresh_global_settings_context()
