"""The typed parameters of a conversion: one source of truth for defaults and validation.

The CLI maps PopRT's flags onto :class:`ConvertParams`; the Prefect deployments use the same
model, so the Prefect UI draws its form (types, descriptions, enum choices) from it.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fp8core.formats import FORMATS, get_format
from fp8core.graph import MIN_FP8_OPSET
from fp8core.pipeline import DEFAULT_DOMINANT_SHARE

FormatName = Literal["F143", "F152", "E4M3FN", "E5M2"]
LossName = Literal["mse", "mae", "snr", "kld", "cos_dist"]
DEFAULT_LOSS = "mse"
"""The search's default loss. PopRT defaults to kld; on the real-model suite and the accuracy suite
mse is best or tied best everywhere (kld, entropy on linear bins, makes the same choices at 2-3x
the search cost; a kld on log-scale bins ruins three real models, see fp8core.losses.kld). See
README, "Defaults"."""
DEFAULT_BATCH_SIZE = 16
TaskRunnerName = Literal["thread", "process", "dask"]


class FP8Params(BaseModel):
    """``--fp8_params F143,F143,-3,-3``: input format, weight format, input scale, weight scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_format: FormatName = Field("F143", description="FP8 format of activations (op inputs)")
    weight_format: FormatName = Field("F143", description="FP8 format of weights")
    input_scale: int = Field(0, ge=-64, le=64, description="activation scale s: value = fp8 * 2**s")
    weight_scale: int = Field(0, ge=-64, le=64, description="weight scale s: value = fp8 * 2**s")

    @field_validator("input_format", "weight_format", mode="before")
    @classmethod
    def _canonical_format(cls, v):
        return get_format(v).name if isinstance(v, str) else v

    @classmethod
    def parse(cls, text: str) -> "FP8Params":
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 4:
            raise ValueError(
                f"--fp8_params {text!r}: expected 4 comma-separated values "
                "INPUT_FORMAT,WEIGHT_FORMAT,INPUT_SCALE,WEIGHT_SCALE, e.g. F143,F143,-3,-3"
            )
        fi, fw, si, sw = parts
        for s in (si, sw):
            try:
                int(s)
            except ValueError:
                raise ValueError(f"--fp8_params {text!r}: scale {s!r} is not an integer") from None
        return cls(input_format=get_format(fi).name, weight_format=get_format(fw).name,
                   input_scale=int(si), weight_scale=int(sw))

    def as_flag(self) -> str:
        return f"{self.input_format},{self.weight_format},{self.input_scale},{self.weight_scale}"


class ConvertParams(BaseModel):
    """Everything one FP8 conversion needs. Field names follow PopRT's flags."""

    model_config = ConfigDict(extra="forbid")

    input_model: str = Field(..., description="path of the FP32/FP16 ONNX model")
    output_model: str | None = Field(None, description="where to write the FP8 model (default: the input path with _fp8 before .onnx)")
    input_shape: dict[str, list[int]] = Field(
        default={}, description="fix dynamic input dims: {input_name: [1, 3, 224, 224]}")
    precision: Literal["fp8", "fp8_weight"] = Field(
        "fp8", description="fp8: FP8 inputs and weights; fp8_weight: FP8 weights only")
    fp8_skip_op_names: list[str] = Field(
        default=[], description="ops kept in original precision, e.g. Conv_0, Gemm_121")
    fp8_params: FP8Params = Field(default=FP8Params(), description="fast-mode formats and scales")
    convert_version: int | None = Field(None, ge=MIN_FP8_OPSET, description="output opset (>= 19; default max(model, 21))")
    external_data: Literal["auto", "always", "never"] = Field(
        "auto", description="write weights to a data file beside the model: auto (when past ~1.9 GiB), always, never")

    quantize: bool = Field(False, description="calibrated quantization: search format and scale per op")
    quantize_loss_type: LossName = Field(
        DEFAULT_LOSS, description="loss minimised by the search (default mse: best or tied best on every real model measured)")
    data_preprocess: str | None = Field(None, description="calibration data: .parquet file or dir, .npz, .pkl")
    fp8_formats: list[FormatName] = Field(
        default=["F143", "F152"], description="formats the search tries")
    batch_size: int | None = Field(
        None, ge=1, le=4096,
        description="calibration samples per batch (default: the model's fixed batch size if it has one, else 16)")
    input_batch_axis: dict[str, int | None] = Field(
        default={}, description="batch axis of inputs whose samples are not stacked on axis 0, "
                                "e.g. {state: 1, sr: null} (null: no batch axis, fed as stored); found from the model by default")
    cache_dir: str | None = Field(
        None, description="cache of captured calibration statistics (default: $FP8_CACHE_DIR or ~/.cache/fp8-pipeline)")
    weight_granularity: Literal["per_tensor", "per_channel"] = Field(
        "per_tensor", description="FP8 weight scales: one per tensor, or one real scale per output channel")
    scale_kind: Literal["pow2", "float"] = Field(
        "pow2", description="per-tensor weight scales: power of two (PopRT) or a searched real number")
    weight_rounding: Literal["auto", "nearest", "gptq", "gptaq"] = Field(
        "auto", description="FP8 weight rounding: to nearest; GPTQ on the captured inputs; or gptaq: weights and "
                            "biases fitted to the inputs the FP8 model gives them, then GPTQ (Conv/MatMul/Gemm; needs "
                            "--quantize). auto: gptaq with --quantize, nearest without it or when the weights are "
                            "streamed from external data")
    activation_offset: Literal["none", "auto"] = Field(
        "none", description="auto (with --quantize): round a non-negative activation (ReLU, ReLU6, sigmoid outputs) "
                            "as x - c, c chosen from its statistics where it lowers the rounding error, and add c "
                            "back through the op's bias (Conv without implicit padding, Gemm, MatMul with a "
                            "constant weight); none (default): no offsets, the FP8 graph of SPEC section 3")
    padding_mask: str = Field(
        "auto", min_length=1,
        description="the model input whose zeros mark padding tokens, whose rows the weight adjustments (the gptaq fit, "
                    "GPTQ, bias correction) leave out; auto: a rank-2 input named *attention_mask or *input_mask; none: every row")
    weight_fit_samples: int = Field(
        128, ge=1, description="the gptaq weight fit reads at most this many calibration samples, evenly spaced over "
                              "the data (the statistics read them all)")
    bias_correction: bool = Field(
        False, description="shift MatMul+Add / Gemm biases so the mean output on the calibration data is unchanged (needs --quantize)")

    precision_compare: bool = Field(
        False, description="compare the FP8 and original models op by op (precision_compare.log)")
    compare_data: str | None = Field(None, description="data for --precision_compare (default: --data_preprocess)")
    compare_samples: int | None = Field(None, ge=1, description="compare on at most this many samples")
    num_of_layers_keep_fp16: int = Field(
        0, ge=0, description="keep in original precision the K FP8 ops whose return helps the model output most, "
                       "measured one by one on the calibration data (PopRT 1.5)")
    keep_dominant_share: float = Field(
        DEFAULT_DOMINANT_SHARE, ge=0, le=1,
        description="with --quantize: keep in original precision each FP8 op (at most 3) whose return alone "
                    "removes at least this share of the model outputs' FP8 noise, measured on 8 calibration "
                    "samples (an image model's first Conv, typically); 0 turns it off. Not used with "
                    "num_of_layers_keep_fp16 or accuracy_target")
    accuracy_target: str | None = Field(
        None, description="METRIC=VALUE on the model outputs, e.g. cos_dist=0.001: keep few ops in "
                          "original precision, the ones that help most, until it is met")
    accuracy_target_samples: int = Field(32, ge=1, description="samples the accuracy-target search measures on")
    accuracy_target_max_keep: int | None = Field(
        None, ge=0, description="keep at most this many ops for the accuracy target; when it is not met "
                                "by then, the best ops found so far stay kept and the run says so")

    task_runner: TaskRunnerName = Field("thread", description="how mapped tasks run")
    dask_address: str | None = Field(None, description="address of a running dask.distributed scheduler")
    max_workers: int | None = Field(None, ge=1, description="parallel workers of the task runner (default: one per CPU)")

    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    experiment_name: str = Field("fp8-convert", min_length=1, description="MLflow experiment")
    log_dir: str | None = Field(None, description="where logs go (default: beside the output model)")
    eval_data: str | None = Field(
        None, description="labelled data (model inputs + 'label' column): report FP32 and FP8 top-1 accuracy")
    register_model: bool = Field(
        False, description="register the FP8 model in the MLflow model registry when it meets its accuracy targets")
    registered_model_name: str | None = Field(
        None, description="registered model name (default: the input file name without .onnx, then -fp8)")
    min_accuracy_fp8: float | None = Field(
        None, ge=0, le=1, description="accuracy target: FP8 top-1 accuracy on eval_data needed to register")
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="accuracy target: FP32/FP8 top-1 agreement on eval_data needed to register")

    @field_validator("fp8_formats", mode="before")
    @classmethod
    def _canonical_formats(cls, v):
        if isinstance(v, str):
            v = [p for p in v.split(",") if p.strip()]
        return [get_format(f).name if isinstance(f, str) else f for f in v]

    @field_validator("convert_version", mode="before")
    @classmethod
    def _fp8_opset(cls, v):
        # before pydantic's own ge=19 check, whose message does not say why or what to do
        if isinstance(v, int) and not isinstance(v, bool) and v < MIN_FP8_OPSET:
            raise ValueError(f"--convert_version {v}: FP8 needs opset >= {MIN_FP8_OPSET}; use {MIN_FP8_OPSET} or higher")
        return v

    @field_validator("input_batch_axis", mode="before")
    @classmethod
    def _parse_batch_axes(cls, v):
        if isinstance(v, str):
            from fp8core.inputs import parse_batch_axes

            return parse_batch_axes(v)
        return v

    @field_validator("fp8_params", mode="before")
    @classmethod
    def _parse_fp8_params(cls, v):
        return FP8Params.parse(v) if isinstance(v, str) else v

    @property
    def keeps_dominant_ops(self) -> bool:
        """--keep_dominant_share applies: --quantize, and neither K nor a target chooses the kept ops."""
        return bool(self.quantize and self.keep_dominant_share and not self.num_of_layers_keep_fp16
                    and not self.accuracy_target)

    @model_validator(mode="after")
    def _defaults_and_consistency(self):
        if self.output_model is None:
            stem, _ = os.path.splitext(self.input_model)
            self.output_model = f"{stem}_fp8.onnx"
        if os.path.abspath(self.output_model) == os.path.abspath(self.input_model):
            raise ValueError("--output_model is the same file as --input_model; the input is never overwritten")
        if self.accuracy_target:
            from fp8core.fallback import AccuracyTarget, FallbackError

            try:
                AccuracyTarget.parse(self.accuracy_target)
            except FallbackError as exc:
                raise ValueError(str(exc)) from None
        if self.accuracy_target_max_keep is not None and not self.accuracy_target:
            raise ValueError("--accuracy_target_max_keep bounds the --accuracy_target search: pass --accuracy_target too")
        needs_data = [f for f in ("precision_compare", "accuracy_target") if getattr(self, f)]
        if needs_data and not (self.compare_data or self.data_preprocess):
            raise ValueError(f"--{needs_data[0]} needs data: pass --compare_data or --data_preprocess PATH")
        if self.num_of_layers_keep_fp16 and not (self.quantize or self.compare_data or self.data_preprocess):
            raise ValueError("--num_of_layers_keep_fp16 ranks ops by measured loss: pass --quantize with "
                             "--data_preprocess, or --compare_data")
        for flag, on in ((f"weight_rounding {self.weight_rounding}", self.weight_rounding in ("gptq", "gptaq")),
                         ("bias_correction", self.bias_correction),
                         ("activation_offset auto", self.activation_offset == "auto")):
            if on and not self.quantize:
                raise ValueError(f"--{flag} uses the captured inputs of each op: add --quantize --data_preprocess PATH")
        if self.padding_mask not in ("auto", "none") and not self.quantize:
            raise ValueError(f"--padding_mask {self.padding_mask} marks padding rows for the weight adjustments on calibration "
                             "data: add --quantize --data_preprocess PATH")
        if self.quantize and not self.data_preprocess:
            raise ValueError("--quantize needs calibration data: pass --data_preprocess PATH")
        if self.task_runner == "dask" and not self.dask_address:
            pass  # a temporary local Dask cluster is started
        if (self.min_accuracy_fp8 is not None or self.min_agreement is not None) and not self.eval_data:
            raise ValueError("an accuracy target (min_accuracy_fp8, min_agreement) needs eval_data: pass labelled data")
        if not self.fp8_formats:
            raise ValueError("--fp8_formats is empty; give at least one of " + ",".join(FORMATS))
        return self

    @property
    def output_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.output_model))

    @property
    def statistics_cache_dir(self) -> str:
        from fp8core.cache import default_cache_dir

        return os.path.abspath(os.path.expanduser(self.cache_dir)) if self.cache_dir else default_cache_dir()

    @property
    def model_registry_name(self) -> str:
        stem = os.path.splitext(os.path.basename(self.input_model))[0]
        return self.registered_model_name or f"{stem}-fp8"

    @property
    def logs_dir(self) -> str:
        return os.path.abspath(self.log_dir) if self.log_dir else self.output_dir

    def with_batch_size(self, model) -> "ConvertParams":
        """These params with ``batch_size`` resolved for ``model``: as given, else the model's
        fixed batch size (an export with batch 1 takes batches of 1), else 16."""
        if self.batch_size is not None:
            return self
        from fp8core.inputs import fixed_batch_size

        return self.model_copy(update={"batch_size": fixed_batch_size(model) or DEFAULT_BATCH_SIZE})

    def as_flags(self) -> dict[str, str]:
        """Every parameter as a flat string dict (MLflow params)."""
        out = {}
        for k, v in self.model_dump().items():
            if k == "fp8_params":
                v = self.fp8_params.as_flag()
            elif isinstance(v, list):
                v = ",".join(map(str, v))
            elif isinstance(v, dict):
                v = " ".join(f"{n}={','.join(map(str, d)) if isinstance(d, list) else d}" for n, d in v.items())
            out[k] = "" if v is None else str(v)
        return out
