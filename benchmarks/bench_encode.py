"""How fast :func:`fp8core.formats.encode` turns a weight-sized float32 array into FP8 bytes.

The reference point is the plainest possible conversion, a bare ml_dtypes cast
(``x.astype(ml_dtypes.float8_e4m3fn)``), timed on the same array in the same process. A bare
cast is not a correct encoder (out-of-range values become NaN instead of saturating, the scale is
ignored), so it is a floor, not a competitor: ``encode`` pays for the scale and the saturation.

The second reference is the rule ``encode`` computed before its table lookup (``STICKY_BITS`` in
``fp8core/formats.py``): clip to +-max, then the ml_dtypes cast, in float32. ``--exhaustive``
checks that ``encode`` gives the same byte as that rule for every one of the 2**32 float32 bit
patterns, in every format (NaN: a NaN byte of the same sign; ~2 minutes).

Every timing is the median of ``--repeats`` runs after one warm-up run, reported in nanoseconds
per element. Results go to ``benchmarks/results/encode.json`` and a markdown table is printed.

    python benchmarks/bench_encode.py [--elements 4194304] [--repeats 5] [--exhaustive]
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


def clip_and_cast(x: np.ndarray, fmt) -> np.ndarray:
    """The encoding rule by ml_dtypes alone (scale 1): saturate, then round."""
    lim = np.float32(fmt.max)
    with np.errstate(invalid="ignore"):
        return np.clip(x, -lim, lim).astype(fmt.dtype).view(np.uint8)


def exhaustive_check(chunk: int = 1 << 24) -> dict[str, int]:
    """Every float32 bit pattern through ``encode`` and :func:`clip_and_cast`: the patterns on
    which they differ, per format (0 expected)."""
    differ = {}
    for fmt in FORMATS.values():
        bad = 0
        for start in range(0, 1 << 32, chunk):
            x = np.arange(start, start + chunk, dtype=np.uint64).astype(np.uint32).view(np.float32)
            got, want = encode(x, fmt), clip_and_cast(x, fmt)
            nan = np.isnan(x)
            bad += int(np.count_nonzero(got[~nan] != want[~nan]))
            decoded = got[nan].view(fmt.dtype).astype(np.float32)
            bad += int(np.count_nonzero(~np.isnan(decoded)))
            if fmt.has_negative_zero:  # a NaN keeps its sign where the format has a signed NaN
                bad += int(np.count_nonzero((got[nan] & 0x80) != (want[nan] & 0x80)))
        differ[fmt.name] = bad
        print(f"exhaustive {fmt.name}: {bad} of 2**32 float32 patterns differ", flush=True)
    return differ


def measure(elements: int, repeats: int) -> list[dict]:
    x = weight_like_array(elements)
    plain_cast_ns = median_ns_per_element(
        lambda: x.astype(ml_dtypes.float8_e4m3fn), elements, repeats)
    rows = [{"what": "ml_dtypes cast x.astype(float8_e4m3fn)", "format": "E4M3FN", "scale": None,
             "ns_per_element": plain_cast_ns, "vs_plain_cast": 1.0}]
    for fmt in FORMATS.values():
        ns = median_ns_per_element(lambda: clip_and_cast(x, fmt), elements, repeats)
        rows.append({"what": "clip + ml_dtypes cast (the rule; encode before its table)", "format": fmt.name,
                     "scale": 0, "ns_per_element": ns, "vs_plain_cast": ns / plain_cast_ns})
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
    parser.add_argument("--exhaustive", action="store_true", help="check every float32 bit pattern too")
    args = parser.parse_args()

    differ = exhaustive_check() if args.exhaustive else None
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
        "exhaustive_patterns_differing": differ,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(rows))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
