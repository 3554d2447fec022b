"""The ``fp8-requantize-nightly`` flow: re-quantize the watched models whose inputs changed.

For each model in the config (flows/nightly_config.py): take the newest calibration data under its
directory, fingerprint the model file (sha256) and the data (CalibrationSource.fingerprint), and
skip the model when both equal the fingerprints of its last successful run and its output still
exists. Otherwise run the ``fp8-convert`` flow (a subflow) with ``--quantize`` on that data.

The state of the last successful runs is a JSON file in the config's output_dir, rewritten
atomically after each successful model, so a failure of one model neither loses the others'
state nor marks it done. A run with any failed model ends Failed, after trying every model.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from prefect import flow, get_run_logger

from flows.nightly_config import ConfigError, ResolvedConfig, WatchedModel, load_config, newest_calibration_data
from flows.errors import failed_state, is_user_error, one_line, quiet_user_error_tracebacks
from tasks.params import ConvertParams
from fp8core.calibration import open_dataset
from fp8core.graph import file_sha256
from fp8core.modelio import write_bytes_atomic

quiet_user_error_tracebacks()
DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "deployments" / "models.yaml")


class RequantizeFailed(RuntimeError):
    """At least one watched model failed to convert; the others were still tried."""


def load_state(path: Path) -> dict:
    """Last successful run per model name; an unreadable state file means 'nothing done yet'."""
    try:
        state = json.loads(path.read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(json.dumps(state, indent=2, sort_keys=True).encode(), str(path))


def fingerprints(config: ResolvedConfig, entry: WatchedModel) -> dict:
    """Model sha256 and the newest calibration data (path and fingerprint) of one watched model."""
    model = config.data_path(entry.model, f"{entry.name}.model")
    data = newest_calibration_data(config.data_path(entry.calibration_dir, f"{entry.name}.calibration_dir"),
                                   entry.calibration_pattern)
    if config.data_dir not in data.resolve().parents:  # a symlink in the directory pointing out
        raise ConfigError(f"{entry.name}: calibration data {data} resolves outside {config.data_dir}")
    return {"model_sha256": file_sha256(str(model)), "data_path": str(data.resolve()),
            "data_fingerprint": open_dataset(data).fingerprint()}


def conversion_params(config: ResolvedConfig, entry: WatchedModel, data_path: str) -> ConvertParams:
    raw = config.raw
    return ConvertParams(
        input_model=str(config.data_path(entry.model, f"{entry.name}.model")),
        output_model=str(config.output_path(entry)),
        quantize=True, data_preprocess=data_path,
        quantize_loss_type=entry.quantize_loss_type, fp8_formats=entry.fp8_formats,
        fp8_skip_op_names=entry.fp8_skip_op_names, batch_size=entry.batch_size,
        eval_data=str(config.data_path(entry.eval_data, f"{entry.name}.eval_data")) if entry.eval_data else None,
        log_dir=str(config.output_dir / f"{entry.name}_logs"),
        mlflow_tracking_uri=raw.mlflow_tracking_uri, experiment_name=raw.experiment_name, cache_dir=raw.cache_dir,
        register_model=entry.register_model, registered_model_name=f"{entry.name}-fp8",
        min_accuracy_fp8=entry.min_accuracy_fp8, min_agreement=entry.min_agreement,
    )


def unchanged(previous: dict | None, current: dict, output_model: Path) -> bool:
    return (previous is not None and output_model.exists()
            and previous.get("model_sha256") == current["model_sha256"]
            and previous.get("data_fingerprint") == current["data_fingerprint"])


@flow(name="fp8-requantize-nightly", log_prints=False)
def fp8_requantize_nightly(config_path: str = DEFAULT_CONFIG, force: bool = False) -> list[dict]:
    """Re-quantize every watched model whose model file or newest calibration data changed.

    config_path: the YAML/JSON config (see flows/nightly_config.py); force: convert even unchanged models.
    """
    from flows.convert import fp8_convert

    log = get_run_logger()
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error(one_line(exc))
        return failed_state(exc)
    state = load_state(config.state_file)
    outcomes = []
    for entry in config.models:
        outcome = {"model": entry.name, "action": "", "detail": "", "mlflow_run_id": ""}
        try:
            current = fingerprints(config, entry)
            output = config.output_path(entry)
            if not force and unchanged(state.get(entry.name), current, output):
                outcome.update(action="skipped", detail="model and calibration data unchanged since the last run")
            else:
                params = conversion_params(config, entry, current["data_path"])
                result = fp8_convert.with_options(flow_run_name=f"fp8-convert {entry.name}")(params)
                state[entry.name] = {**current, "output_model": result["output_model"],
                                     "mlflow_run_id": result["mlflow_run_id"],
                                     "finished": datetime.datetime.now(datetime.timezone.utc).isoformat()}
                save_state(config.state_file, state)
                outcome.update(action="converted", mlflow_run_id=result["mlflow_run_id"],
                               detail=f"data {os.path.basename(current['data_path'])}, "
                                      f"{result['fp8_ops']} FP8 ops")
        except Exception as exc:
            # a user error is one line; an internal one keeps its traceback for whoever debugs it
            log.error("%s: %s: %s", entry.name, type(exc).__name__, one_line(exc), exc_info=not is_user_error(exc))
            outcome.update(action="failed", detail=f"{type(exc).__name__}: {one_line(exc)}")
        log.info("%s: %s (%s)", entry.name, outcome["action"], outcome["detail"])
        outcomes.append(outcome)
    _publish_summary(outcomes)
    failed = [o["model"] for o in outcomes if o["action"] == "failed"]
    if failed:
        return failed_state(RequantizeFailed(f"re-quantization failed for {', '.join(failed)}; see the flow run logs"))
    return outcomes


def _publish_summary(outcomes: list[dict]) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(outcomes, key="fp8-requantize-summary", description="what the nightly run did per model")
