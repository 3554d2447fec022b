"""How mapped work is cut and how many workers run it (flows/runners.py), with a real flow."""

from __future__ import annotations

import os

import numpy as np
import pytest
from prefect import flow

from tasks.params import ConvertParams
from flows.runners import map_search, search_groups, task_runner, workers
from fp8core.search import search
from fp8core.stats import TensorStats


@pytest.mark.parametrize("n, count", [(0, 4), (1, 4), (3, 4), (4, 4), (5, 4), (104, 4), (104, 1), (7, 100)])
def test_search_groups_cover_every_key_once_in_order_and_balanced(n, count):
    keys = [f"t{i}" for i in range(n)]
    groups = search_groups(keys, count)
    assert [k for g in groups for k in g] == keys
    assert len(groups) == min(count, n)
    if groups:
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_workers_default_to_the_cpu_count_not_unbounded():
    # Prefect's ThreadPoolTaskRunner(max_workers=None) means sys.maxsize threads.
    params = ConvertParams(input_model="m.onnx")
    assert workers(params) == (os.cpu_count() or 1)
    assert task_runner(params)._max_workers == workers(params)
    assert workers(ConvertParams(input_model="m.onnx", max_workers=3)) == 3


def test_grouped_mapped_search_equals_searching_each_tensor(tmp_path):
    rng = np.random.default_rng(7)
    stats = {f"t{i}": TensorStats().update(rng.standard_normal(500 + 100 * i).astype(np.float32) * 2.0 ** i)
             for i in range(7)}
    params = ConvertParams(input_model="m.onnx", quantize_loss_type="mse", max_workers=2)

    @flow
    def run():
        with task_runner(params) as runner:
            return map_search(stats, params, runner)

    results = run()
    assert list(results) == list(stats)
    for name, s in stats.items():
        expected = search(s, "mse", tuple(params.fp8_formats))
        assert (results[name].format, results[name].scale, results[name].loss) == (expected.format, expected.scale, expected.loss)
