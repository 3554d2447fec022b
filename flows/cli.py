"""``fp8-convert``: PopRT's FP8 flags on top of the Prefect flow.

With no arguments it converts the demo model in data/ and reports its accuracy.
Exit codes: 0 done, 2 bad input (one line on stderr says what and how to fix), 1 internal error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from flows.errors import UsageError, is_user_error, one_line

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "data" / "demo_model.onnx"
DEMO_CALIB = REPO / "data" / "calib.parquet"
DEMO_EVAL = REPO / "data" / "eval.parquet"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        raise UsageError(f"{message} (see fp8-convert --help)")


def _shape_arg(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.partition("=")
    try:
        values = [int(d) for d in dims.split(",")]
        if not sep or not name or any(v <= 0 for v in values):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input_shape {text!r}: expected NAME=D1,D2,... with positive integers, e.g. input=1,3,224,224") from None
    return name, values


def build_parser() -> argparse.ArgumentParser:
    from tasks.params import DEFAULT_DOMINANT_SHARE, DEFAULT_LOSS

    p = _Parser(prog="fp8-convert", description="Convert an FP32/FP16 ONNX model to FP8 mixed precision (PopRT-compatible flags).")
    p.add_argument("--input_model", help="FP32/FP16 ONNX model (default: the demo model in data/)")
    p.add_argument("--output_model", help="where to write the FP8 model (default: <input>_fp8.onnx)")
    p.add_argument("--input_shape", nargs="+", type=_shape_arg, default=[], metavar="NAME=D1,D2,...", help="fix dynamic input dims")
    p.add_argument("--precision", choices=["fp8", "fp8_weight"], default="fp8")
    p.add_argument("--fp8_skip_op_names", default="", metavar="OP1,OP2", help="ops kept in original precision, e.g. Conv_0,Gemm_121")
    p.add_argument("--fp8_params", metavar="FMT_IN,FMT_W,S_IN,S_W", help="fast mode formats and scales (default F143,F143,0,0)")
    p.add_argument("--convert_version", type=int, metavar="OPSET", help="output opset, >= 19 (default: max(model opset, 21))")
    p.add_argument("--external_data", choices=["auto", "always", "never"], default="auto",
                   help="weights in a <output>.<hash>.data file beside the model: auto (when past ~1.9 GiB), always, never")
    p.add_argument("--quantize", "--calibration_with_data", dest="quantize", action="store_true", help="search format and scale per op on calibration data")
    p.add_argument("--quantize_loss_type", "--calibration_loss_type", dest="quantize_loss_type", default=DEFAULT_LOSS, choices=["mse", "mae", "snr", "kld", "cos_dist"],
                   help=f"loss the format/scale search minimises (default {DEFAULT_LOSS}: best or tied best on every real model measured; README)")
    p.add_argument("--data_preprocess", metavar="PATH", help="calibration data: .parquet file or directory, .npz, .pkl")
    p.add_argument("--fp8_formats", default="F143,F152", metavar="FMT,FMT", help="formats the search tries")
    p.add_argument("--batch_size", type=int, help="calibration samples per batch (default: the model's fixed batch, else 16)")
    p.add_argument("--input_batch_axis", metavar="NAME=AXIS,...",
                   help="batch axis of inputs not batched on axis 0, or none: e.g. state=1,sr=none (default: found from the model)")
    p.add_argument("--cache_dir", metavar="DIR", help="cache of captured calibration statistics (default: $FP8_CACHE_DIR or ~/.cache/fp8-pipeline)")
    p.add_argument("--weight_granularity", choices=["per_tensor", "per_channel"], default="per_tensor",
                   help="FP8 weight scales: per tensor, or one real scale per output channel")
    p.add_argument("--scale_kind", choices=["pow2", "float"], default="pow2",
                   help="per-tensor weight scales: power of two (PopRT) or a searched real number")
    p.add_argument("--weight_rounding", choices=["auto", "nearest", "gptq", "gptaq"], default="auto",
                   help="FP8 weight rounding: nearest; GPTQ on the captured inputs; gptaq: weights and biases fitted "
                        "to the inputs the FP8 model gives them (needs --quantize); auto (default): gptaq with "
                        "--quantize, nearest in fast mode or when the weights are streamed from external data")
    p.add_argument("--activation_offset", choices=["none", "auto"], default="none",
                   help="auto (with --quantize): round non-negative activations (ReLU/ReLU6/sigmoid outputs) as x - c "
                        "and add c back through the op's bias, where it lowers the rounding error (default none)")
    p.add_argument("--padding_mask", metavar="auto|none|INPUT", default="auto",
                   help="the input whose zeros mark padding tokens: the weight fit, GPTQ and bias correction leave their "
                        "rows out (default auto: a [batch, tokens] input named *attention_mask or *input_mask; none: fit every row)")
    p.add_argument("--weight_fit_samples", type=int, metavar="N", default=128,
                   help="the gptaq weight fit reads at most N calibration samples, evenly spaced over the data "
                        "(default 128; the statistics read them all)")
    p.add_argument("--bias_correction", action="store_true",
                   help="keep the mean output of MatMul+Add / Gemm on the calibration data (needs --quantize)")
    p.add_argument("--precision_compare", action="store_true", help="compare FP8 and original op by op: precision_compare.log/.json/.png")
    p.add_argument("--compare_data", metavar="PATH", help="data for --precision_compare / --accuracy_target (default: --data_preprocess)")
    p.add_argument("--compare_samples", type=int, metavar="N", help="compare on at most N samples")
    p.add_argument("--num_of_layers_keep_fp16", type=int, default=0, metavar="K", help="keep in original precision the K FP8 ops whose return helps the model output most (measured)")
    p.add_argument("--keep_dominant_share", type=float, default=DEFAULT_DOMINANT_SHARE, metavar="S",
                   help="with --quantize: keep each op (at most 3) whose return alone removes at least this share "
                        f"of the outputs' FP8 noise (default {DEFAULT_DOMINANT_SHARE}; 0: off)")
    p.add_argument("--accuracy_target", metavar="METRIC=VALUE", help="e.g. cos_dist=0.001: keep the ops that help most in original precision until it is met")
    p.add_argument("--accuracy_target_samples", type=int, default=32, metavar="N", help="samples the accuracy-target search uses")
    p.add_argument("--accuracy_target_max_keep", type=int, metavar="N",
                   help="keep at most N ops for the accuracy target (the best N found when it is not met)")
    p.add_argument("--task_runner", choices=["thread", "process", "dask"], default="thread")
    p.add_argument("--dask_address", metavar="HOST:PORT", help="running dask.distributed scheduler (implies --task_runner dask)")
    p.add_argument("--max_workers", type=int, help="parallel workers of the task runner (default: one per CPU)")
    p.add_argument("--eval_data", metavar="PATH", help="labelled data (model inputs + 'label' column): report FP32 and FP8 top-1 accuracy")
    p.add_argument("--log_dir", metavar="DIR", help="where quantize.log etc. go (default: beside the output model)")
    p.add_argument("--mlflow_tracking_uri", metavar="URI", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment_name", default="fp8-convert", help="MLflow experiment")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logs (-vv: debug)")
    return p


def _params_from_args(args) -> "ConvertParams":
    from tasks.params import ConvertParams

    fields = dict(
        input_shape=dict(args.input_shape),
        precision=args.precision,
        fp8_skip_op_names=[s.strip() for s in args.fp8_skip_op_names.split(",") if s.strip()],
        convert_version=args.convert_version,
        external_data=args.external_data,
        quantize=args.quantize,
        quantize_loss_type=args.quantize_loss_type,
        data_preprocess=args.data_preprocess,
        fp8_formats=args.fp8_formats,
        batch_size=args.batch_size,
        input_batch_axis=args.input_batch_axis or {},
        cache_dir=args.cache_dir,
        weight_granularity=args.weight_granularity,
        scale_kind=args.scale_kind,
        weight_rounding=args.weight_rounding,
        bias_correction=args.bias_correction,
        activation_offset=args.activation_offset,
        padding_mask=args.padding_mask,
        weight_fit_samples=args.weight_fit_samples,
        task_runner="dask" if args.dask_address else args.task_runner,
        dask_address=args.dask_address,
        max_workers=args.max_workers,
        mlflow_tracking_uri=args.mlflow_tracking_uri,
        experiment_name=args.experiment_name,
        log_dir=args.log_dir,
        eval_data=args.eval_data,
        precision_compare=args.precision_compare,
        compare_data=args.compare_data,
        compare_samples=args.compare_samples,
        num_of_layers_keep_fp16=args.num_of_layers_keep_fp16,
        keep_dominant_share=args.keep_dominant_share,
        accuracy_target=args.accuracy_target,
        accuracy_target_samples=args.accuracy_target_samples,
        accuracy_target_max_keep=args.accuracy_target_max_keep,
    )
    if args.fp8_params:
        fields["fp8_params"] = args.fp8_params
    if args.input_model is None:  # the demo: calibrated conversion of data/demo_model.onnx
        os.makedirs("out", exist_ok=True)
        fields.update(input_model=str(DEMO_MODEL), output_model=args.output_model or "out/demo_model_fp8.onnx")
        if not args.data_preprocess:
            fields.update(quantize=True, data_preprocess=str(DEMO_CALIB))
        fields.update(eval_data=args.eval_data or str(DEMO_EVAL))
    else:
        fields.update(input_model=args.input_model, output_model=args.output_model)
    return ConvertParams(**fields)


def _check_paths_before_the_flow(params) -> None:
    """Fail in milliseconds, not after the ~10 s Prefect server start, on a wrong path."""
    from fp8core.graph import load_model
    from fp8core.modelio import check_output_path

    if not os.path.isfile(params.input_model):
        load_model(params.input_model)  # raises the ModelError that says what is wrong
    check_output_path(params.output_model)
    for flag, what, path in (("--data_preprocess", "calibration data", params.data_preprocess),
                             ("--compare_data", "comparison data", params.compare_data)):
        if path and not os.path.exists(path):
            from fp8core.calibration import CalibrationDataError

            raise CalibrationDataError(f"{what} {path} does not exist; check the {flag} path")
    if params.eval_data:
        from fp8core.evaluate import open_evaluation_data

        open_evaluation_data(params.eval_data)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (main() may run many times in one process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _configure_environment(verbose: int) -> None:
    """Quiet, offline Prefect and MLflow; set before they are imported."""
    import logging

    import warnings

    # requests imports urllib3's SOCKS support when a proxy variable names one; without PySocks
    # that prints a DependencyWarning on every run although no SOCKS proxy is ever used
    warnings.filterwarnings("ignore", message="SOCKS support in urllib3")
    # MLflow silences this pydantic warning inside warnings.catch_warnings(), which is not thread
    # safe: a catch_warnings exiting in another thread (Prefect's workers) can restore a filter
    # list without MLflow's entry, and the warning reached stderr in one CI run. Set here, before
    # any thread, it is in every saved list.
    warnings.filterwarnings("ignore", message='Field name "schema" in "JsonSchemaSpec" shadows an attribute',
                            category=UserWarning)
    user_log = logging.getLogger("fp8")  # warnings meant for the user, shown even when quiet
    if not user_log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("fp8-convert: %(levelname)s: %(message)s"))
        user_log.addHandler(handler)
        user_log.propagate = False
    user_log.setLevel(logging.INFO if verbose else logging.WARNING)
    env = os.environ
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    env.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", ["CRITICAL", "INFO", "DEBUG"][min(verbose, 2)])


MMAP_THRESHOLD = 8 << 20
"""Arrays from this size up are mapped anew and returned to the OS when freed. At 1 MiB every
im2col piece and product of the default weight fit was a fresh mapping, page-faulted on first
touch (ResNet50's fit, library run: 42.7 s against 33.3 s at 8 MiB); the batch-sized arrays the
fixed threshold exists for are larger than 8 MiB (ResNet50 capture at 500 samples: peak RSS
1.10 GB at 1 MiB, 1.16 GB at 8 MiB, the same at 50 samples: flat either way)."""


def _return_large_frees_to_the_os() -> None:
    """glibc raises its mmap threshold after big frees (up to 32 MiB), so batch-sized arrays then
    fragment the heap and peak RSS creeps up with the number of batches; a fixed threshold keeps
    it flat. It costs time where fresh memory is expensive to touch (every large array is mapped
    anew: a 3 GB fast conversion 32 -> 42 s on a VM), so only runs that read data in batches set it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, containers, Prefect cancellation): handled like Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _reads_data_in_batches(params) -> bool:
    """Calibration, comparison or evaluation data: the runs whose memory the threshold keeps flat."""
    return bool(params.data_preprocess or params.compare_data or params.eval_data)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    argv = sys.argv[1:] if argv is None else argv
    verbose = sum(a.count("v") for a in argv if a.startswith("-") and set(a[1:]) == {"v"}) + argv.count("--verbose")
    _configure_environment(verbose)
    try:
        args = build_parser().parse_args(argv)
        params = _params_from_args(args)
        if _reads_data_in_batches(params):
            _return_large_frees_to_the_os()
        _check_paths_before_the_flow(params)
        from flows.startup import start_prefect_server_early

        start_prefect_server_early()
        from flows.convert import run_conversion
        from fp8core.report import summary_lines

        result = run_conversion(params, verbose=args.verbose)
    except _Terminated:
        print("fp8-convert: terminated (SIGTERM); no output written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("fp8-convert: interrupted; no output written", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except Exception as exc:
        if is_user_error(exc):
            print(f"fp8-convert: error: {one_line(exc)}", file=sys.stderr)
            return 2
        if verbose:
            raise
        print(f"fp8-convert: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with -v for the traceback)", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
