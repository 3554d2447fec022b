"""``--weight_rounding gptq|gptaq`` / ``--bias_correction``: capture the FP8 linear ops' input moments
on the calibration data, then return a float model whose weights/biases the encoder turns into FP8.
``gptaq`` fits each op's weight and bias to the input the FP8 model gives it (fp8core/activation_fit.py).
Bias correction is measured on the FP8 model: each op's bias removes the mean output shift the
op adds itself, activations included (fp8core/bias_shift.py).

Runs after the fallback step: the fallback trials measure round-to-nearest weights.
"""

from __future__ import annotations

from prefect import get_run_logger

from tasks.params import ConvertParams
from fp8core.activation_fit import fit_to_fp8_inputs
from fp8core.bias_shift import correct_mean_shift
from fp8core.feature_moments import capture_feature_moments
from fp8core.model import Model
from fp8core.plan import OpPlan
from fp8core.weight_adjust import adjust_weights, linear_ops, moment_requests
from tasks.ingest import ingest_calibration_data


def adjusted_model(loaded: Model, plans: list[OpPlan], params: ConvertParams, record) -> tuple[Model, list[dict]]:
    """The float model to encode (a copy with GPTQ weights / corrected biases) and a per-op report."""
    gptq = params.weight_rounding == "gptq"
    source = ingest_calibration_data(params.data_preprocess, loaded, params.batch_size)
    model, report = loaded.proto, []
    if params.weight_rounding == "gptaq":
        # one pass, each op fitted to its own input rounding in the FP8 model: a fit to the float
        # model's inputs in a few passes over-compensates (EfficientNet-Lite0: top-1 0.01)
        model, report = fit_to_fp8_inputs(loaded, plans, source, params.batch_size, passes=1, local=True)
    if gptq:
        ops = linear_ops(model, plans)
        moments = capture_feature_moments(model, moment_requests(ops, True, False), source, params.batch_size)
        model, report = adjust_weights(model, plans, moments, True, False)
    if params.bias_correction:
        # after GPTQ: the shift of the weights as they will be stored
        model, shifts = correct_mean_shift(loaded.derive(model), plans, source, params.batch_size)
        by_op = {row["op"]: row for row in report}
        for row in shifts:
            by_op.setdefault(row["op"], {"op": row["op"]}).update(row)
        report = list(by_op.values())
    for row in report:
        for key in ("output_sq_error_nearest", "output_sq_error_gptq", "own_mean_shift_max",
                    "output_error_reduction"):
            if key in row:
                record.metrics({f"{key}/{row['op']}": row[key]})
    record.json_artifact({"weight_rounding": params.weight_rounding, "bias_correction": params.bias_correction,
                          "ops": report}, "weight_adjust.json")
    get_run_logger().info("weight adjustments: %d ops (%s)", len(report),
                          ", ".join(f for f, on in (("GPTQ", gptq), ("GPTAQ fit", params.weight_rounding == "gptaq"),
                                                    ("bias correction", params.bias_correction)) if on))
    return loaded.derive(model), report
