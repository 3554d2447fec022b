"""How long the real-valued FP8 weight-scale search takes on ~10M parameters, per loss.

``fp8core.weight_scales.real_scale_params(w, axis, ("F143", "F152"), loss)`` - the search of
``--weight_granularity per_channel`` (25 candidate scales per output channel and format, then the
format by the whole weight's loss) - on a seeded set of seven weights, 10,092,544 parameters:

* Conv ``[512, 512, 3, 3]`` x2 and ``[256, 256, 3, 3]`` x2 (axis 0), Student-t(4) values with
  per-channel magnitudes spread over 2^-3..2^3;
* MatMul ``[1024, 1024]`` x2 (axis 1, the last), Gaussian;
* Gemm ``[2048, 1024]`` with transB=1 (axis 0), Laplace.

Each time is the median of ``--repeats`` runs over the whole set, wall and CPU time (the CPU
time of this process: the wall time on an idle machine, the search's own cost on a busy one).
The baseline is the search as it was before it was vectorised (kept below, verbatim but for
names: a round trip of the whole weight per candidate, float64 copies per candidate, kld one
channel at a time with ``np.unique`` over (bin, q, saturated) per channel); it runs
``--baseline-repeats`` times (kld takes minutes) and the table checks both chose the same
formats, scales and losses.
``--per-tensor`` also times ``--scale_kind float`` (one real scale per weight, axis None; no
baseline). Results: ``benchmarks/results/weight_scales.json`` and ``weight_scales.md``.

    python benchmarks/bench_weight_scales.py [--repeats 3] [--baseline-repeats 1] [--no-baseline]
                                             [--per-tensor] [--losses mse kld ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from fp8core import losses
from fp8core.formats import encode_to_dtype, get_format, round_trip
from fp8core.losses import JointHistogram, error_sums_from_arrays, get_loss
from fp8core.plan import RealScaleParams
from fp8core.stats import bin_keys
from fp8core.scale import storable
from fp8core.weight_scales import SCALE_STEPS, candidate_scales, dequantized_weight, real_scale_params

RESULTS = Path(__file__).parent / "results"
FORMATS = ("F143", "F152")
LOSSES = ("mse", "mae", "snr", "kld", "cos_dist")


def weight_set(seed: int = 0) -> list[tuple[str, np.ndarray, int]]:
    """(name, float32 weight, output-channel axis) of the benchmark, ~10M parameters."""
    rng = np.random.default_rng(seed)

    def conv(c_out, c_in):
        spread = np.exp2(rng.uniform(-3, 3, c_out))[:, None, None, None]
        return (rng.standard_t(4, (c_out, c_in, 3, 3)) * 0.02 * spread).astype(np.float32)
    return [("conv_512x512x3x3_a", conv(512, 512), 0), ("conv_512x512x3x3_b", conv(512, 512), 0),
            ("conv_256x256x3x3_a", conv(256, 256), 0), ("conv_256x256x3x3_b", conv(256, 256), 0),
            ("matmul_1024x1024_a", (rng.standard_normal((1024, 1024)) * 0.03).astype(np.float32), 1),
            ("matmul_1024x1024_b", (rng.standard_normal((1024, 1024)) * 0.03).astype(np.float32), 1),
            ("gemm_2048x1024_transB", rng.laplace(0, 0.02, (2048, 1024)).astype(np.float32), 0)]


# --- the baseline: the search before it was vectorised (fp8core/weights.py, weight_options.py,
# --- losses.py at 1692584), for the timing and to check the results are the same ----------------

def _old_joint_from_arrays(x32: np.ndarray, q32: np.ndarray) -> JointHistogram:
    keys = bin_keys(x32)
    r = float(np.max(np.abs(q32))) if q32.size else 0.0
    saturated = (np.abs(x32.astype(np.float64)) > r).astype(np.intp)
    q_bits = q32.view(np.uint32)
    if np.all(q_bits & 0xFFFF == 0):
        ids = (q_bits >> 16).astype(np.intp)
        ids[ids == 0x8000] = 0
        present = np.flatnonzero(np.bincount(ids, minlength=1 << 16))
        compact = np.zeros(1 << 16, np.intp)
        compact[present] = np.arange(present.size)
        groups = present.size
        counts = np.bincount((keys * groups + compact[ids]) * 2 + saturated, minlength=0)
        rows = np.flatnonzero(counts)
        pairs = rows // 2
        q_values = (present[pairs % groups].astype(np.uint32) << 16).view(np.float32)
        return JointHistogram(pairs // groups, q_values.astype(np.float64), counts[rows],
                              (rows % 2).astype(bool))
    rows, counts = np.unique(np.stack([keys, q32.astype(np.float64) + 0.0, saturated]), axis=1,
                             return_counts=True)
    return JointHistogram(rows[0].astype(np.int64), rows[1], counts, rows[2].astype(bool))


def _old_loss(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    loss = get_loss(name)
    if not loss.needs_histogram:
        return loss

    def with_old_histogram(x, q):
        x32 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        q32 = np.ascontiguousarray(q, dtype=np.float32).reshape(-1)
        sums = dataclasses.replace(error_sums_from_arrays(x32, q32), joint=_old_joint_from_arrays(x32, q32))
        return loss.of_sums(sums)
    return with_old_histogram


def _old_along(v, axis, ndim):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v).reshape(shape)


def _old_channel_losses(w, q, axis, loss):
    x = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)
    y = np.moveaxis(np.asarray(q, np.float64), axis, 0).reshape(w.shape[axis], -1)
    if loss not in ("mse", "mae", "snr", "cos_dist"):
        fn = _old_loss(loss)
        return np.array([fn(x[c].astype(np.float32), y[c].astype(np.float32)) for c in range(x.shape[0])])
    e = x - y
    if loss == "mse":
        return np.mean(e * e, axis=1)
    if loss == "mae":
        return np.mean(np.abs(e), axis=1)
    x_sq = np.sum(x * x, axis=1)
    if loss == "snr":
        return np.where(x_sq > 0, np.sum(e * e, axis=1) / np.where(x_sq > 0, x_sq, 1), 0.0)
    y_sq = np.sum(y * y, axis=1)
    nx, ny = np.sqrt(np.where(x_sq > 0, x_sq, 1)), np.sqrt(np.where(y_sq > 0, y_sq, 1))
    unit = x / nx[:, None] - y / ny[:, None]
    d = np.maximum(0.0, np.sum(unit * unit, axis=1) / 2)
    return np.where((x_sq == 0) | (y_sq == 0), np.where(x_sq == y_sq, 0.0, 1.0), d)


def _old_quantize_per_channel(w, axis, fmt, loss):
    w = np.asarray(w)
    if not np.isfinite(w).all():
        raise ValueError("the weight has NaN or inf values")
    steps = list(SCALE_STEPS)
    absmax = np.max(np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)), axis=1).astype(np.float64)
    cands = candidate_scales(absmax, fmt, steps)
    w32 = np.asarray(w, dtype=np.float32)
    table = np.stack([_old_channel_losses(w, round_trip(w32 / _old_along(s, axis, w.ndim), fmt, 0)
                                          * _old_along(s, axis, w.ndim), axis, loss) for s in cands])
    order = sorted(range(len(steps)), key=lambda i: (abs(steps[i]), steps[i]))
    best = np.full(w.shape[axis], order[0])
    for i in order[1:]:
        cur = table[best, np.arange(best.size)]
        better = table[i] < cur - 1e-9 * np.abs(cur)
        best = np.where(better, i, best)
    scales = cands[best, np.arange(best.size)]
    encode_to_dtype(np.asarray(w, np.float32) / _old_along(scales, axis, w.ndim), fmt, 0)  # its FP8 weight
    return scales


def old_real_scale_params(w, axis, formats, loss, elem_type=onnx.TensorProto.FLOAT) -> RealScaleParams:
    w32 = np.asarray(w, np.float32)
    loss_fn = _old_loss(loss)
    best = None
    for fmt in formats:
        fmt = get_format(fmt).name
        if axis is None:
            chosen = _old_quantize_per_channel(w32.reshape(1, -1), 0, fmt, loss)
        else:
            chosen = _old_quantize_per_channel(w32, axis, fmt, loss)
        scales = storable(chosen, elem_type)
        geomean = float(np.exp2(np.mean(np.log2(scales.astype(np.float64)))))
        p = RealScaleParams(fmt, round(math.log2(geomean)), "per_tensor" if axis is None else "per_channel",
                            axis, tuple(float(s) for s in scales))
        value = float(loss_fn(w32.reshape(-1), dequantized_weight(w32, p).reshape(-1)))
        p = dataclasses.replace(p, loss=value)
        if best is None or value < best.loss:
            best = p
    return best


# --- measurement -----------------------------------------------------------------------------------

def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, list[float], float, object]:
    """Median wall time, every wall time, median CPU time of this process, and the last result.

    numpy runs the search on one thread, so without other work on the machine the CPU time is the
    wall time; with other work it is what the search itself cost."""
    times, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = run()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), times, statistics.median(cpu), result


def search_all(search, weights, loss, per_tensor=False):
    return [search(w, None if per_tensor else axis, FORMATS, loss) for _, w, axis in weights]


def same_results(a: list[RealScaleParams], b: list[RealScaleParams]) -> bool:
    """Same formats, scales (and so FP8 bytes) and the same whole-weight loss."""
    return all(p == q and p.loss == q.loss for p, q in zip(a, b, strict=True))


def measure(args) -> dict:
    load_before = os.getloadavg()[0]  # other work on the machine slows every time here
    weights = weight_set()
    rows = []
    for loss in args.losses:
        seconds, times, cpu, new = median_seconds(lambda: search_all(real_scale_params, weights, loss),
                                                  args.repeats)
        row = {"loss": loss, "granularity": "per_channel", "seconds": seconds, "runs": times,
               "cpu_seconds": cpu, "formats": [p.format for p in new]}
        if args.baseline:
            base_s, base_times, base_cpu, old = median_seconds(
                lambda: search_all(old_real_scale_params, weights, loss), args.baseline_repeats)
            row.update(baseline_seconds=base_s, baseline_runs=base_times, baseline_cpu_seconds=base_cpu,
                       speedup=base_s / seconds, same_as_baseline=same_results(new, old))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.per_tensor:
        for loss in args.losses:
            seconds, times, cpu, new = median_seconds(
                lambda: search_all(real_scale_params, weights, loss, per_tensor=True), args.repeats)
            rows.append({"loss": loss, "granularity": "per_tensor (scale_kind float)", "seconds": seconds,
                         "runs": times, "cpu_seconds": cpu, "formats": [p.format for p in new]})
            print(json.dumps(rows[-1]), flush=True)
    return {
        "benchmark": "fp8core.weight_scales.real_scale_params(w, axis, ('F143', 'F152'), loss) "
                     "over a ~10M-parameter weight set",
        "weights": [{"name": n, "shape": list(w.shape), "axis": a} for n, w, a in weights],
        "parameters": int(sum(w.size for _, w, _ in weights)),
        "statistic": f"median wall (and CPU) time of {args.repeats} runs over the whole set "
                     f"(baseline: {args.baseline_repeats})",
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
        "numpy": np.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "rows": rows,
    }


def markdown(report: dict) -> str:
    lines = [f"`real_scale_params(w, axis, (\"F143\", \"F152\"), loss)` over {report['parameters']:,} "
             f"parameters ({len(report['weights'])} Conv/MatMul/Gemm weights), "
             f"{report['statistic']}; {report['cpu_count']} CPUs, numpy {report['numpy']}, "
             f"1-minute load average {report['load_average_before']:.2f} before, "
             f"{report['load_average_after']:.2f} after (other jobs on the machine).", "",
             "| loss | granularity | seconds | CPU seconds | baseline seconds | baseline CPU seconds "
             "| speedup | same result as baseline |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        base = (f"{r['baseline_seconds']:.1f} | {r['baseline_cpu_seconds']:.1f} | {r['speedup']:.0f}x "
                f"| {r['same_as_baseline']}" if "baseline_seconds" in r else "- | - | - | -")
        lines.append(f"| {r['loss']} | {r['granularity']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {base} |")
    lines += ["", "Baseline: the search before it was vectorised, kept in the benchmark script "
              "(a round trip of the whole weight and float64 copies per candidate; kld one channel "
              "at a time with `np.unique` per channel). Same result: formats, scales, FP8 bytes and "
              "the whole-weight loss identical.", "",
              "Reproduce: `python benchmarks/bench_weight_scales.py --per-tensor`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-repeats", type=int, default=1)
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--per-tensor", action="store_true", help="also time --scale_kind float (axis None)")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(losses.LOSSES))
    parser.add_argument("--output", type=Path, default=RESULTS / "weight_scales.json")
    args = parser.parse_args()
    report = measure(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
