"""Two runs writing the same output path at once cannot corrupt it: readers always see a whole model."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ProcessPoolExecutor

import onnx

from fp8core.modelio import save_model_atomic, serialize
from models import matmul_chain


def _write_many(path: str, seed: int, times: int) -> None:
    model = matmul_chain(size=256, seed=seed)
    for _ in range(times):
        save_model_atomic(model, path)


def _expected(seed: int) -> bytes:
    return serialize(matmul_chain(size=256, seed=seed))


def test_concurrent_writers_leave_one_whole_model_and_readers_never_see_a_partial_one(tmp_path):
    path = str(tmp_path / "out.onnx")
    versions = {_expected(1), _expected(2)}
    assert len(versions) == 2
    seen = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            if os.path.exists(path):
                try:
                    with open(path, "rb") as f:
                        seen.append(f.read())
                except FileNotFoundError:
                    pass

    t = threading.Thread(target=reader)
    t.start()
    try:
        with ProcessPoolExecutor(2) as pool:
            for f in [pool.submit(_write_many, path, s, 15) for s in (1, 2)]:
                f.result()
    finally:
        stop.set()
        t.join()
    with open(path, "rb") as f:
        assert f.read() in versions
    assert seen and all(data in versions for data in seen), "a reader saw a partial model"
    onnx.checker.check_model(onnx.load(path))
    leftovers = [n for n in os.listdir(tmp_path) if n != "out.onnx"]
    assert leftovers == [], leftovers
