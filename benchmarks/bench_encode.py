"""How fast :func:`fp8core.formats.encode` turns a weight-sized float32 array into FP8 bytes.

The reference point is the plainest possible conversion, a bare ml_dtypes cast
(``x.astype(ml_dtypes.float8_e4m3fn)``), timed on the same array in the same process. A bare
cast is not a correct encoder (out-of-range values become NaN instead of saturating, the scale is
ignored), so it is a floor, not a competitor: ``encode`` pays for the scale and the saturation.

Every timing is the median of ``--repeats`` runs after one warm-up run, reported in nanoseconds
per element. Results go to ``benchmarks/results/encode.json`` and a markdown table is printed.

    /work/venv/bin/python benchmarks/bench_encode.py [--elements 4194304] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from fp8core.formats import FORMATS, encode

RESULTS_PATH = Path(__file__).parent / "results" / "encode.json"
SCALES = (0, -5)


def median_ns_per_element(run: Callable[[], object], elements: int, repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` runs (after one warm-up), per element."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        run()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / elements


def weight_like_array(elements: int, seed: int = 0) -> np.ndarray:
    """Normal random float32 values, the shape of a trained weight tensor's distribution."""
    return np.random.default_rng(seed).standard_normal(elements, dtype=np.float32)


def measure(elements: int, repeats: int) -> list[dict]:
    x = weight_like_array(elements)
    plain_cast_ns = median_ns_per_element(
        lambda: x.astype(ml_dtypes.float8_e4m3fn), elements, repeats)
    rows = [{"what": "ml_dtypes cast x.astype(float8_e4m3fn)", "format": "E4M3FN", "scale": None,
             "ns_per_element": plain_cast_ns, "vs_plain_cast": 1.0}]
    for fmt in FORMATS.values():
        for scale in SCALES:
            ns = median_ns_per_element(lambda: encode(x, fmt, scale), elements, repeats)
            rows.append({"what": "fp8core encode", "format": fmt.name, "scale": scale,
                         "ns_per_element": ns, "vs_plain_cast": ns / plain_cast_ns})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| what | format | scale | ns/element | x plain cast |", "|---|---|---|---:|---:|"]
    for r in rows:
        scale = "-" if r["scale"] is None else str(r["scale"])
        lines.append(f"| {r['what']} | {r['format']} | {scale} | {r['ns_per_element']:.2f} "
                     f"| {r['vs_plain_cast']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args()

    rows = measure(args.elements, args.repeats)
    report = {
        "benchmark": "fp8core.formats.encode vs plain ml_dtypes cast",
        "elements": args.elements,
        "input": "float32 standard normal, seed 0",
        "statistic": f"median of {args.repeats} runs after 1 warm-up, ns per element",
        "numpy": np.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(rows))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
