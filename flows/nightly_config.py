"""The nightly re-quantization config: which models to watch, where their data is, what to write.

A YAML (or JSON) file::

    data_dir: ../data                # models, calibration and eval data live under here
    output_dir: ~/.local/share/fp8-pipeline/nightly   # FP8 models, logs, state file
    experiment_name: fp8-nightly     # MLflow experiment (runs grouped per model by run name)
    models:
      - name: demo
        model: demo_model.onnx           # relative to data_dir
        calibration_dir: .               # relative to data_dir; the NEWEST data in it is used
        calibration_pattern: "calib*.parquet"
        eval_data: eval.parquet          # optional, relative to data_dir
        output_model: demo_fp8.onnx      # optional, relative to output_dir (default <name>_fp8.onnx)
        min_accuracy_fp8: 0.95           # optional accuracy target for the model registry

``data_dir`` and ``output_dir`` are relative to the config file (or absolute; ``~`` and
``$VARIABLES`` are expanded). Every other path is relative to
its root and must stay inside it after resolving ``..`` and symlinks: a config cannot make the
flow read or write elsewhere (:class:`ConfigError`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.params import DEFAULT_LOSS, FormatName, LossName
from fp8core.errors import FP8Error, first_line

CALIBRATION_SUFFIXES = (".parquet", ".npz", ".pkl", ".pickle")
STATE_FILE = "requantize_state.json"


class ConfigError(FP8Error):
    """The re-quantization config is unreadable, invalid, or names a path outside its roots."""


class WatchedModel(BaseModel):
    """One model the nightly flow re-quantizes when its model file or newest calibration data changes."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="unique name (state key, run name)")
    model: str = Field(..., description="ONNX model, relative to data_dir")
    calibration_dir: str = Field(..., description="directory under data_dir; its newest calibration data is used")
    calibration_pattern: str = Field("*", description="glob filtering the candidates in calibration_dir")
    eval_data: str | None = Field(None, description="labelled data relative to data_dir (accuracy, targets)")
    output_model: str | None = Field(None, description="relative to output_dir (default: the entry name with _fp8.onnx)")
    quantize_loss_type: LossName = DEFAULT_LOSS
    fp8_formats: list[FormatName] = Field(default_factory=lambda: ["F143", "F152"])
    fp8_skip_op_names: list[str] = Field(default_factory=list)
    batch_size: int = Field(16, ge=1, le=4096)
    register_model: bool = Field(True, description="register the FP8 model when its targets are met")
    min_accuracy_fp8: float | None = Field(None, ge=0, le=1)
    min_agreement: float | None = Field(None, ge=0, le=1)


class WatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: str
    output_dir: str
    experiment_name: str = "fp8-nightly"
    mlflow_tracking_uri: str | None = None
    cache_dir: str | None = None
    models: list[WatchedModel] = Field(..., min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models):
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return models


class ResolvedConfig:
    """A validated config whose roots are absolute, resolved directories."""

    def __init__(self, path: Path, raw: WatchConfig):
        self.path = path
        self.raw = raw
        self.data_dir = (path.parent / _expanded(raw.data_dir)).resolve()
        self.output_dir = (path.parent / _expanded(raw.output_dir)).resolve()
        if not self.data_dir.is_dir():
            raise ConfigError(f"{path}: data_dir {self.data_dir} is not a directory; fix data_dir (relative to the config file)")
        self.models = raw.models
        self.state_file = self.output_dir / STATE_FILE

    def data_path(self, relative: str, what: str) -> Path:
        return inside(self.data_dir, relative, f"{self.path}: {what}")

    def output_path(self, model: WatchedModel) -> Path:
        return inside(self.output_dir, model.output_model or f"{model.name}_fp8.onnx", f"{self.path}: {model.name}.output_model")


def _expanded(root: str) -> Path:
    return Path(os.path.expandvars(root)).expanduser()


def inside(root: Path, relative: str, what: str) -> Path:
    """``root / relative`` resolved (``..``, symlinks); ConfigError when it is absolute or leaves ``root``."""
    if os.path.isabs(relative):
        raise ConfigError(f"{what} {relative!r} is absolute; give a path relative to {root}")
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise ConfigError(f"{what} {relative!r} leaves {root}; paths must stay inside it")
    return path


def load_config(path: str | os.PathLike) -> ResolvedConfig:
    """Read and validate the config (YAML or JSON)."""
    path = Path(path).resolve()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the re-quantization config {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        raise ConfigError(f"{path}: not valid YAML: {first_line(exc)}") from None
    try:
        raw = WatchConfig.model_validate(data if isinstance(data, dict) else {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"{path}: {loc}: {err['msg']}") from None
    return ResolvedConfig(path, raw)


def _newest_mtime(path: Path) -> float:
    if path.is_file():
        return path.stat().st_mtime
    times = [p.stat().st_mtime for p in path.rglob("*") if p.is_file()]
    return max(times, default=path.stat().st_mtime)


def newest_calibration_data(directory: Path, pattern: str = "*") -> Path:
    """The newest calibration data in ``directory``: a data file (.parquet .npz .pkl .pickle) or a
    sub-directory of Parquet files, by the latest modification time of its files (ties: last name)."""
    if not directory.is_dir():
        raise ConfigError(f"calibration directory {directory} does not exist")
    candidates = []
    for entry in directory.glob(pattern):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix in CALIBRATION_SUFFIXES:
            candidates.append(entry)
        elif entry.is_dir() and any(entry.rglob("*.parquet")):
            candidates.append(entry)
    if not candidates:
        raise ConfigError(f"no calibration data matching {pattern!r} in {directory}")
    return max(candidates, key=lambda p: (_newest_mtime(p), p.name))
