"""Shared fixtures: every test runs Prefect and MLflow offline, in throwaway homes.

The environment is set when this file is imported, i.e. before any test module is collected:
Prefect reads its settings (PREFECT_HOME, the API URL) once, when it is first imported, so a
fixture would be too late for a test module that imports ``tasks`` or ``flows.convert`` at the top.
Child processes (the CLI run in a subprocess) inherit the same environment, so their Prefect
temporary server writes to the same database that the tests then query.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data"

_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="fp8-tests-prefect-home-"))
# Registered before Prefect is imported, so it runs after Prefect's own atexit hook has stopped
# its temporary server (atexit runs hooks last-in, first-out).
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)

# Never talk to a real Prefect server or MLflow store a developer has configured.
for _name in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH", "PREFECT_API_DATABASE_CONNECTION_URL",
              "MLFLOW_TRACKING_URI"):
    os.environ.pop(_name, None)
os.environ.update(
    PREFECT_HOME=str(_PREFECT_HOME),
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    DO_NOT_TRACK="1",
    MLFLOW_DISABLE_TELEMETRY="true",
    # Prefect's console handler would log "Stopping temporary server" at interpreter exit, after
    # pytest has closed the captured stream; the CLI sets this level by default anyway.
    PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="CRITICAL",
    # Dask worker processes (tests/test_dask.py) start their own temporary Prefect server on
    # the session's database, which grows with every flow run of the suite: give them the
    # CLI's start-up allowance (the default 20 s timed out late in a loaded full run)
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    # statistics captured by an earlier run (other code) must not feed this one
    FP8_CACHE_DIR=str(_PREFECT_HOME / "stats-cache"),
)


# Property tests draw the same examples on every run by default, so CI on a clean clone cannot
# fail on a draw nobody saw locally; HYPOTHESIS_PROFILE=explore draws fresh random examples (and
# more of them) to hunt for new failures, which then go into the tests as @example.
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # hypothesis is in the [test] extra; without it only its tests are missing
    pass
else:
    _hypothesis_settings.register_profile("ci", derandomize=True, database=None)
    _hypothesis_settings.register_profile("explore", derandomize=False)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def prefect_home() -> Path:
    """The session's PREFECT_HOME (a temp dir): its prefect.db holds every flow run of the tests."""
    return _PREFECT_HOME


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    return DATA_DIR / "demo_model.onnx"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current working directory (the CLI's defaults, e.g. sqlite:///mlflow.db, land here)."""
    path = tmp_path / "work"
    path.mkdir()
    monkeypatch.chdir(path)
    return path
