"""fp8core.stream: one pass over the data feeds several accumulators with the results of separate
passes, bit for bit; data that does not fit the model fails with one message before any run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fp8core.calibration import ArraySource, CalibrationDataError
from fp8core.capture import StatsAccumulator, capture_stats
from fp8core.feature_moments import MomentAccumulator, capture_feature_moments, gptq_requests
from fp8core.graph import pruned_to
from fp8core.plan import QuantParams, plan_fp8_ops
from fp8core.stream import StreamError, Tap, accumulate, stream
import models
from test_stats_speed_equivalence import assert_identical

TENSORS = ["x", "r1", "f", "g"]


def _data(n=21, seed=5):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def test_one_pass_feeds_two_accumulators_as_two_separate_passes():
    """Capture's pass (runs of 2 samples, fold on its own thread) also feeding GPTQ's moments gives
    the statistics of capture alone and the moments of the moments' own pass (one run per batch)."""
    model = models.cnn(seed=2, names=True)
    plans = plan_fp8_ops(model, "fp8", [], QuantParams("F143", 0), None)
    requests = gptq_requests(model, plans)
    assert {rows.tensor for rows, _ in requests.values()} == {"x", "r1", "f", "g"}  # Conv, dw Conv, Gemm, MatMul
    source = ArraySource(Path("x.npz"), {"x": _data()})

    moments = MomentAccumulator(requests)
    together = capture_stats(model, TENSORS, source, batch_size=8, also=[moments])
    alone = capture_stats(model, TENSORS, source, batch_size=8)
    separate = capture_feature_moments(model, requests, source, batch_size=8)

    assert moments.complete and moments.runs == 11  # 21 samples: batches of 8, 8, 5 run 2 at a time
    for name in TENSORS:
        assert_identical(together[name], alone[name])
    assert list(moments.moments) == list(separate)
    for key, m in separate.items():
        got = moments.moments[key]
        assert got.count == m.count > 0
        assert np.array_equal(got.total, m.total) and np.array_equal(got.gram, m.gram), key


def test_accumulators_see_each_run_once_in_order_and_values_are_dropped_after_the_last_reader():
    model = models.cnn(seed=1)
    source = ArraySource(Path("x.npz"), {"x": _data(9)})
    seen = []

    class Recorder:
        def __init__(self, tensors, take):
            self.tensors, self.take = tensors, take

        def add_batch(self, batch):
            seen.append((self.tensors[0], batch.index, batch.start, batch.count, batch.last, sorted(batch.values)))
            for name in self.tensors:
                if self.take:
                    batch.take(name)

    first, second = Recorder(["f", "g"], True), Recorder(["g"], True)
    accumulate(stream(model, source, ["f", "g"], batch_size=4, run_samples=2), [first, second], overlap=True)
    # batches of 4, 4, 1 in runs of 2: (0,0) (0,2) (1,4) (1,6) (2,8)
    runs = [(0, 0, 2, False), (0, 2, 2, True), (1, 4, 2, False), (1, 6, 2, True), (2, 8, 1, True)]
    assert [s[1:5] for s in seen[0::2]] == runs and [s[1:5] for s in seen[1::2]] == runs
    assert all(s[5] == ["f", "g"] for s in seen[0::2])
    assert all(s[5] == ["g"] for s in seen[1::2])  # "f" dropped by its only reader, "g" kept for the next


def test_paired_runs_read_both_models_on_the_same_feeds():
    a, b = models.cnn(seed=1), models.cnn(seed=2)
    x = _data(6)
    source = ArraySource(Path("x.npz"), {"x": x})
    outs = [(batch.values["y"], batch.paired["y"])
            for batch in stream(a, source, ["y"], batch_size=4, paired=(b, ["y"]))]
    want_a = Tap(a, ["y"]).run({"x": x}, 0)["y"]
    want_b = Tap(b, ["y"]).run({"x": x}, 0)["y"]
    np.testing.assert_allclose(np.concatenate([o[0] for o in outs]), want_a, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([o[1] for o in outs]), want_b, rtol=1e-6)


def test_a_pruned_tap_runs_only_what_its_tensors_need_with_the_same_values():
    """onnxruntime runs every node whatever a run fetches: a pruned tap's model stops at the
    tensors it reads (the weight fit's passes read the first ops' inputs), bit for bit the same
    values; an If body's reads of the outer scope count, and graph inputs all stay."""
    model = models.cnn(seed=1, names=True)
    x = _data(5)
    for tensors in (["r1"], ["r1", "f"], ["y"]):
        whole, cut = Tap(model, tensors).run({"x": x}, 0), Tap(model, tensors, prune=True).run({"x": x}, 0)
        for name in tensors:
            assert whole[name].tobytes() == cut[name].tobytes(), name
    early = pruned_to(model, ["r1"])
    assert len(early.graph.node) < len(model.graph.node) and [o.name for o in early.graph.output] == ["r1"]
    assert "y" not in {o for n in early.graph.node for o in n.output}

    branchy = models.if_reads_weight()
    assert [n.name for n in pruned_to(branchy, ["y"]).graph.node] == ["mm", "branch"]  # the body reads "a"
    head = pruned_to(branchy, ["a"])
    assert [n.name for n in head.graph.node] == ["mm"] and [i.name for i in head.graph.input] == ["x", "cond"]
    feeds = {"x": np.eye(8, dtype=np.float32), "cond": np.array(True)}
    got = Tap(branchy, ["a"], prune=True).run(feeds, 0)["a"]
    np.testing.assert_array_equal(got, Tap(branchy, ["a"]).run(feeds, 0)["a"])


@pytest.mark.parametrize("arrays, says", [
    ({"image": np.zeros((4, 3, 8, 8), np.float32)}, r"lacks model input\(s\) 'x'; its columns are 'image'"),
    ({"x": np.zeros((4, 3, 7, 7), np.float32)}, r"'x' samples have shape \(3, 7, 7\) but the model takes \(3, 8, 8\)"),
    ({"x": np.zeros((4, 3, 8, 8), np.complex64)}, r"column 'x' holds complex64 values"),
])
def test_data_that_does_not_fit_the_model_gives_one_message_before_any_run(arrays, says):
    model = models.cnn()
    source = ArraySource(Path("bad.npz"), arrays)
    calls = [lambda: capture_stats(model, TENSORS, source, batch_size=4),
             lambda: capture_feature_moments(model, gptq_requests(model, plan_fp8_ops(
                 model, "fp8", [], QuantParams("F143", 0), None)), source, batch_size=4),
             lambda: list(stream(model, source, ["y"], batch_size=4, paired=(models.cnn(seed=1), ["y"])))]
    messages = set()
    for call in calls:
        with pytest.raises(CalibrationDataError, match=says) as caught:
            call()
        assert "\n" not in str(caught.value)
        messages.add(str(caught.value))
    assert len(messages) == 1  # the same line whichever pass reads the data


def test_a_run_onnxruntime_rejects_names_the_sample_and_the_model():
    from test_faults import _gather_model

    model = _gather_model()
    idx = np.zeros((10, 1), np.int64)
    idx[6] = 7  # out of the table's 3 rows
    source = ArraySource(Path("c.npz"), {"x": np.ones((10, 4), np.float32), "idx": idx})
    with pytest.raises(StreamError, match=r"^comparison sample 6 makes onnxruntime fail running the FP8 model: "):
        list(stream(Tap(model, ["y"], what="comparison", label="the FP8 model"), source, batch_size=4))


def test_a_model_that_runs_each_sample_but_not_a_batch_says_so():
    """y = MatMul(x, W) + W with W [4, 4]: a batch of 1 (or 4) broadcasts, a batch of 2 does not."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Add", ["a", "W"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", T.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    source = ArraySource(Path("c.npz"), {"x": np.ones((6, 4), np.float32)})
    with pytest.raises(StreamError, match=r"^onnxruntime failed running the model on calibration samples 0\.\.1 together, "
                                          r"though each runs alone \(.*broadcast.*\): the model does not take batches "
                                          r"of 2; give --batch_size 1$"):
        list(stream(Tap(model, ["y"], what="calibration", label="the model"), source, batch_size=2))
    assert len(list(stream(Tap(model, ["y"], what="calibration", label="the model"), source, batch_size=1))) == 6
