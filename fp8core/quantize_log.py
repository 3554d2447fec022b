"""Apply searched (format, scale) choices to a plan and write quantize.log / quantize.json.

quantize.log (SPEC section 6): for every FP8 op, for its input(s) and weight, the loss of every
(format, scale) candidate tried, the chosen one marked, and the tensor's statistics
(mean, variance, skewness, kurtosis, absmax). quantize.json holds the same, machine-readable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from fp8core.charts import per_op_bar_chart
from fp8core.modelio import write_bytes_atomic
from fp8core.plan import OpPlan, QuantParams, RealScaleParams
from fp8core.scale import fits


def _allowed(plan: OpPlan, scale: int) -> bool:
    return fits(scale, plan.elem_type)


def _choice(plan: OpPlan, result) -> QuantParams:
    """The best candidate whose scale the op's float type can hold (float16 limits 2**s)."""
    if _allowed(plan, result.scale):
        return QuantParams(result.format, result.scale)
    ok = [c for c in result.candidates if _allowed(plan, c.scale)]
    best = min(ok, key=lambda c: c.loss)  # candidates are in tie-break order: min keeps the first
    return QuantParams(best.format, best.scale)


def apply_choices(plans: list[OpPlan], results: dict) -> list[OpPlan]:
    """Copies of ``plans`` with every FP8 op input/weight set to its searched params."""
    out = []
    for plan in plans:
        plan = dataclasses.replace(plan, inputs=[dataclasses.replace(q) for q in plan.inputs])
        if plan.fp8:
            for q in plan.inputs:
                q.params = _choice(plan, results[q.tensor])
        out.append(plan)
    return out


def _finite(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _stats_dict(s) -> dict:
    return {k: _finite(float(getattr(s, k))) for k in ("count", "mean", "variance", "skewness", "kurtosis", "absmax")}


def quantize_report(plans: list[OpPlan], results: dict, stats: dict, loss: str, source=None) -> dict:
    ops = []
    for plan in plans:
        entry = {"name": plan.name, "op_type": plan.op_type, "position": plan.position, "fp8": plan.fp8,
                 "reason": plan.reason, "tensors": [], "best_loss": None}
        if plan.fp8:
            total = 0.0
            for q in plan.inputs:
                r = results[q.tensor]
                # real scales (per_channel / float) were searched on the weight itself, not in the bins
                chosen_loss = (q.params.loss if isinstance(q.params, RealScaleParams)
                               else r.loss_of(q.params.format, q.params.scale))
                entry["tensors"].append({
                    "role": q.role, "tensor": q.tensor, "input_index": q.index,
                    "chosen": q.params.describe(),
                    "loss": _finite(chosen_loss),
                    "statistics": _stats_dict(stats[q.tensor]),
                    "candidates": [{"format": c.format, "scale": c.scale, "loss": _finite(c.loss)} for c in r.candidates],
                })
                total += chosen_loss
            entry["best_loss"] = _finite(total)
        ops.append(entry)
    return {
        "loss": loss,
        "calibration": None if source is None else {"path": str(source.path), "samples": source.num_samples,
                                                     "fingerprint": source.fingerprint()},
        "ops": ops,
    }


def format_quantize_log(report: dict) -> str:
    lines = [f"FP8 calibrated quantization, loss {report['loss']}"]
    if report.get("calibration"):
        c = report["calibration"]
        lines.append(f"calibration data: {c['path']} ({c['samples']} samples, sha256 {c['fingerprint']})")
    for op in report["ops"]:
        lines.append("")
        if not op["fp8"]:
            lines.append(f"{op['name']} ({op['op_type']}): {op['reason']}")
            continue
        lines.append(f"{op['name']} ({op['op_type']})")
        for t in op["tensors"]:
            s = t["statistics"]
            ch = t["chosen"]
            lines.append(f"  {t['role']} {t['tensor']}: chosen {ch['format']} scale {ch['scale']} loss {_num(t['loss'])}"
                         + (f"; rounded as x - {ch['offset']:g} (activation offset; the losses are of x itself)"
                            if ch.get("offset") else ""))
            if "scales" in ch:  # real-valued scales: a summary, the values are in the model
                r = ch["scales"]
                lines.append(f"    real scales (axis {ch['axis']}): count {r['count']}  min {_num(r['min'])}  "
                             f"max {_num(r['max'])}  geomean {_num(r['geomean'])}")
            lines.append("    stats: " + "  ".join(f"{k} {_num(s[k])}" for k in ("mean", "variance", "skewness", "kurtosis", "absmax"))
                         + f"  n {int(s['count'] or 0)}")
            for c in t["candidates"]:
                mark = " <- best" if (c["format"], c["scale"]) == (ch["format"], ch["scale"]) else ""
                lines.append(f"    {c['format']:<6} scale {c['scale']:>4}  loss {_num(c['loss'])}{mark}")
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "nan" if v is None else f"{v:.6g}"


def loss_chart(report: dict, path: str) -> None:
    """PNG: the chosen loss of every FP8 op, in graph order."""
    ops = [o for o in report["ops"] if o["fp8"]]
    values = [o["best_loss"] if o["best_loss"] is not None else float("nan") for o in ops]
    per_op_bar_chart(path, [o["name"] for o in ops], values, f"{report['loss']} (input + weight)",
                     "Chosen FP8 loss per op, graph order", log_scale=True)


def write_quantize_logs(report: dict, folder: str) -> dict[str, str]:
    os.makedirs(folder, exist_ok=True)
    paths = {"log": os.path.join(folder, "quantize.log"), "json": os.path.join(folder, "quantize.json"),
             "chart": os.path.join(folder, "quantize_loss.png")}
    write_bytes_atomic(format_quantize_log(report).encode(), paths["log"])
    write_bytes_atomic((json.dumps(report, indent=1, sort_keys=True) + "\n").encode(), paths["json"])
    loss_chart(report, paths["chart"])
    return paths
