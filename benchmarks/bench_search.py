"""How much faster the binned (format, scale) search is than brute force, per loss.

One activation-sized float32 tensor (Laplace, heavy-tailed like real activations, with ReLU-like
exact zeros on a quarter of it) is searched over both Graphcore formats and every scale of
:func:`fp8core.search.candidate_scales` - the same candidate list for both methods:

* binned: :class:`fp8core.stats.TensorStats` built once from the values (shared by all losses,
  timed separately), then :func:`fp8core.search.search` per loss;
* brute force: :func:`fp8core.search.brute_force_search`, which round-trips every value for
  every candidate (and needs every value in memory).

Each time is the median of ``--repeats`` runs (brute force: ``--brute-repeats``, it takes
minutes). The table also checks that both methods chose the same candidate and reports the
largest relative difference between their candidate losses. Results go to
``benchmarks/results/search.json`` and a markdown table is printed.

    /work/venv/bin/python benchmarks/bench_search.py [--elements 20000000] [--repeats 3]
                                                     [--brute-repeats 3]
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

import numpy as np

from fp8core.losses import LOSSES, get_loss
from fp8core.search import brute_force_search, candidate_scales, choose, search
from fp8core.stats import TensorStats

RESULTS_PATH = Path(__file__).parent / "results" / "search.json"
FORMATS = ("F143", "F152")


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``run()`` over ``repeats`` runs, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def activation_like_array(elements: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.laplace(0.0, 0.7, elements).astype(np.float32)
    x[rng.random(elements) < 0.25] = 0.0
    return x


def max_relative_difference(candidates, references) -> float:
    assert [(c.format, c.scale) for c in candidates] == [(c.format, c.scale) for c in references]
    got = np.array([c.loss for c in candidates])
    want = np.array([c.loss for c in references])
    scale = np.maximum(np.abs(want), 1e-300)
    return float(np.max(np.abs(got - want) / scale))


def measure(elements: int, repeats: int, brute_repeats: int) -> tuple[dict, list[dict]]:
    x = activation_like_array(elements)
    build_s, stats = median_seconds(lambda: TensorStats.from_array(x), repeats)
    windows = {f: candidate_scales(stats, f) for f in FORMATS}
    setup = {"stats_build_s": build_s, "stats_bytes": stats.nbytes,
             "windows": {f: [w.start, w.stop - 1] for f, w in windows.items()},
             "candidates": sum(len(w) for w in windows.values())}
    rows = []
    for loss in LOSSES:
        search_s, binned = median_seconds(lambda: search(stats, loss, FORMATS), repeats)
        brute_s, brute_candidates = 0.0, []
        for fmt, window in windows.items():
            seconds, ref = median_seconds(
                lambda: brute_force_search(x, loss, [fmt], window), brute_repeats)
            brute_s += seconds
            brute_candidates += ref.candidates
        brute_win = choose(brute_candidates, get_loss(loss), FORMATS)
        rows.append({
            "loss": loss, "binned_search_s": search_s, "binned_total_s": build_s + search_s,
            "brute_force_s": brute_s, "speedup_total": brute_s / (build_s + search_s),
            "binned_choice": [binned.format, binned.scale],
            "brute_force_choice": [brute_win.format, brute_win.scale],
            "same_choice": (binned.format, binned.scale) == (brute_win.format, brute_win.scale),
            "max_rel_loss_diff": max_relative_difference(binned.candidates, brute_candidates),
        })
    return setup, rows


def markdown_table(setup: dict, rows: list[dict]) -> str:
    lines = [f"stats build (shared by all losses): {setup['stats_build_s']:.2f} s, "
             f"{setup['candidates']} candidates {setup['windows']}", "",
             "| loss | binned search s | binned total s | brute force s | speedup | same choice "
             "| max rel diff |", "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['binned_search_s']:.3f} | {r['binned_total_s']:.2f} "
                     f"| {r['brute_force_s']:.1f} | {r['speedup_total']:.0f}x "
                     f"| {r['same_choice']} | {r['max_rel_loss_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=20_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--brute-repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args()

    setup, rows = measure(args.elements, args.repeats, args.brute_repeats)
    report = {
        "benchmark": "fp8core.search binned search vs brute force, F143 and F152, every scale "
                     "of the window",
        "elements": args.elements,
        "input": "float32 Laplace(0, 0.7), 25% exact zeros, seed 0",
        "statistic": f"median wall time of {args.repeats} runs (brute force: "
                     f"{args.brute_repeats}); binned total = stats build + search",
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        **setup,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(setup, rows))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
