"""MLflow: the one place that talks to it.

Every call goes through an explicit ``MlflowClient`` and run id (no global active run), so tasks in
worker threads, processes or Dask workers can record into the same run safely.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from typing import Iterator

from tasks.params import ConvertParams

DEFAULT_DB = "mlflow.db"


def tracking_uri(explicit: str | None = None) -> str:
    """--mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite file in the working dir."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{os.path.abspath(DEFAULT_DB)}"


def open_store(explicit: str | None = None, verbose: int = 0) -> None:
    """Build MLflow's store for the tracking URI now (cached by MLflow for the process): on a new
    SQLite file that runs its schema migrations (~1.5 s), which the CLI overlaps with other work."""
    _quiet_mlflow(verbose)
    _client(tracking_uri(explicit))


def _client(uri: str):
    """An MlflowClient whose store is built: for a SQLite file, under a lock beside it, because
    MLflow's schema migration on a new file is not safe against a second process migrating it at
    the same time (two users' first runs on one machine: one failed with an alembic error)."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    import fcntl
    import hashlib

    # the lock lives in the temp dir, not beside the database, so the user's folder gains no file
    db = os.path.abspath(uri[len("sqlite:///"):])
    key = hashlib.sha256(db.encode()).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"fp8-mlflow-{key}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            client._tracking_client.store  # builds the store (and migrates) now, under the lock
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def _artifact_root(uri: str) -> str | None:
    """For a local SQLite store, keep artifacts beside the database file."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
    return None


class Recorder:
    """One MLflow run: params, tags, metrics, artifacts, final status."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    @property
    def url_path(self) -> str:
        run = self.client.get_run(self.run_id)
        return f"#/experiments/{run.info.experiment_id}/runs/{self.run_id}"

    def params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, (v or "")[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def tags(self, tags: dict[str, str]) -> None:
        for k, v in sorted(tags.items()):
            self.client.set_tag(self.run_id, k, str(v))

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, step) for k, v in sorted(metrics.items())]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def artifact(self, path: str, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, folder)

    def json_artifact(self, obj, name: str, folder: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, name)
            with open(p, "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True)
            self.client.log_artifact(self.run_id, p, folder)

    def stage(self, result) -> None:
        """What a pipeline stage says a run keeps (fp8core.pipeline.StageResult): its tags, its
        metrics (and those logged at a step), its files and JSON documents."""
        if result.tags:
            self.tags(dict(result.tags))
        if result.metrics:
            self.metrics(dict(result.metrics))
        for step, metrics in result.steps:
            self.metrics(dict(metrics), step=step)
        for artifact in result.artifacts:
            if artifact.path is not None:
                self.artifact(artifact.path)
            else:
                self.json_artifact(artifact.data, artifact.name)

    def figure(self, fig, name: str) -> None:
        self.client.log_figure(self.run_id, fig, name)

    def web_url(self, uri: str) -> str | None:
        """The run's page in the MLflow UI when the store is a tracking server, else None."""
        if not uri.startswith(("http://", "https://")):
            return None
        return f"{uri.rstrip('/')}/{self.url_path}"

    def register_model(self, model_path: str, name: str, description: str = "") -> str:
        """Log ``model_path`` under artifact folder ``fp8_model`` and register it as a new version of
        ``name`` (the registered model is created on first use); returns the version number."""
        from mlflow.exceptions import MlflowException

        self.artifact(model_path, MODEL_ARTIFACT_DIR)
        try:
            self.client.create_registered_model(name, description="FP8 mixed-precision ONNX models (fp8-convert)")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(
            name, source=f"runs:/{self.run_id}/{MODEL_ARTIFACT_DIR}", run_id=self.run_id, description=description)
        self.tags({"registered_model": name, "registered_model_version": version.version})
        return str(version.version)


MODEL_ARTIFACT_DIR = "fp8_model"


def unmet_accuracy_targets(params: ConvertParams, evaluation: dict | None) -> list[str]:
    """Why the run misses its accuracy targets (empty when every target given is met).

    Targets: ``min_accuracy_fp8`` <= FP8 top-1 accuracy, ``min_agreement`` <= FP32/FP8 top-1
    agreement, both measured on ``eval_data``.
    """
    unmet = []
    for target, key in ((params.min_accuracy_fp8, "accuracy_fp8"), (params.min_agreement, "agreement")):
        if target is None:
            continue
        value = (evaluation or {}).get(key)
        if value is None:
            unmet.append(f"{key} not measured (no eval_data)")
        elif value < target:
            unmet.append(f"{key} {value:.4f} < target {target:.4f}")
    return unmet


MAX_KEY_LENGTH = 250  # MLflow's limit on a metric name (mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH)


def _metric_key(key: str) -> str:
    """A valid MLflow key: alphanumerics, _ - . space / only, and a clean relative path (MLflow
    refuses '//', a leading '/' and '..' parts; torch exports name ops like '/bert/encoder/MatMul').
    Past MAX_KEY_LENGTH characters (TensorFlow exports name ops like 'StatefulPartitionedCall/
    model_1/.../Conv2D' several times over) the middle gives way to a hash of the whole name, so
    the key keeps its start (what is measured) and end (the op) and stays one key per name."""
    clean = "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)
    parts = [p if p not in (".", "..") else p.replace(".", "_") for p in clean.split("/") if p]
    clean = "/".join(parts) or "_"
    if len(clean) <= MAX_KEY_LENGTH:
        return clean
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    head, tail = clean[:80].rstrip("/"), clean[-(MAX_KEY_LENGTH - 80 - len(digest) - 2):].lstrip("/")
    return f"{head}-{digest}-{tail}"


def _quiet_mlflow(verbose: int) -> None:
    level = logging.INFO if verbose else logging.WARNING
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(level)


def _experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, creating it if needed; safe when two runs create it at the same time."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_root(uri))
        except MlflowException:  # another run created it in between
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    return exp.experiment_id


@contextlib.contextmanager
def conversion_run(params: ConvertParams, run_name: str, verbose: int = 0) -> Iterator[Recorder]:
    """Open an MLflow run for one conversion; mark it FINISHED, FAILED (with the error) or KILLED."""
    _quiet_mlflow(verbose)
    from prefect.exceptions import ExternalSignal

    uri = tracking_uri(params.mlflow_tracking_uri)
    client = _client(uri)
    run = client.create_run(_experiment_id(client, params.experiment_name, uri), run_name=run_name)
    rec = Recorder(client, run.info.run_id)
    rec.params(params.as_flags())
    try:
        yield rec
    except (KeyboardInterrupt, ExternalSignal) as exc:  # Ctrl-C; SIGTERM (Prefect turns it into TerminationSignal)
        client.set_tag(rec.run_id, "error", "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt)
                       else "terminated (SIGTERM)")
        client.set_terminated(rec.run_id, "KILLED")
        raise
    except BaseException as exc:
        client.set_tag(rec.run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
        client.set_terminated(rec.run_id, "FAILED")
        raise
    else:
        client.set_terminated(rec.run_id, "FINISHED")
