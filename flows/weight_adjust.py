"""``--weight_rounding gptq`` / ``--bias_correction``: capture the FP8 linear ops' input moments on
the calibration data, then return a float model whose weights/biases the encoder turns into FP8.
Bias correction is analytic (the op's own FP8 weight, float inputs) and then measured on the FP8
model (what the FP8 activations and every op upstream add: fp8core/bias_shift.py).

Runs after the fallback step: the fallback trials measure round-to-nearest weights.
"""

from __future__ import annotations

from prefect import get_run_logger

from flows.params import ConvertParams
from fp8core.bias_shift import correct_mean_shift
from fp8core.feature_moments import capture_feature_moments
from fp8core.plan import OpPlan
from fp8core.weight_adjust import adjust_weights, linear_ops, moment_requests
from tasks.ingest import ingest_calibration_data


def adjusted_model(model, plans: list[OpPlan], params: ConvertParams, record):
    """The float model to encode (a copy with GPTQ weights / corrected biases) and a per-op report."""
    gptq = params.weight_rounding == "gptq"
    ops = linear_ops(model, plans)
    source = ingest_calibration_data(params.data_preprocess, model, params.batch_size)
    moments = capture_feature_moments(model, moment_requests(ops, gptq, params.bias_correction), source,
                                      params.batch_size)
    new_model, report = adjust_weights(model, plans, moments, gptq, params.bias_correction)
    if params.bias_correction:
        # what is left: the mean shift the FP8 activations and every op upstream add (measured)
        new_model, shifts = correct_mean_shift(new_model, plans, source, params.batch_size)
        by_op = {row["op"]: row for row in report}
        for row in shifts:
            by_op.setdefault(row["op"], {"op": row["op"], "op_type": "", "weight": ""}).update(
                mean_shift_by_round=row["shift_by_round"], mean_shift_left=row["shift_left"],
                bias_max_shift_measured=row["bias_max_change"])
            record.metrics({f"mean_shift_left/{row['op']}": row["shift_left"]})
        report = list(by_op.values())
        if shifts:
            get_run_logger().info("bias correction (measured on the FP8 model): largest channel mean shift %.3g -> %.3g",
                                  max(r["shift_by_round"][0] for r in shifts), max(r["shift_left"] for r in shifts))
    for row in report:
        for key in ("output_sq_error_nearest", "output_sq_error_gptq", "bias_max_shift"):
            if key in row:
                record.metrics({f"{key}/{row['op']}": row[key]})
    record.json_artifact({"weight_rounding": params.weight_rounding, "bias_correction": params.bias_correction,
                          "ops": report}, "weight_adjust.json")
    convs = sum(row["op_type"] == "Conv" for row in report)
    get_run_logger().info("weight adjustments: %d ops (%d Conv, %d MatMul/Gemm)", len(report), convs, len(report) - convs)
    return new_model, report
