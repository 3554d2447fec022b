"""fp8core.activation_fit: weights fitted to the inputs the FP8 model gives them (--weight_rounding gptaq)."""

from __future__ import annotations

import itertools
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from onnx import numpy_helper

from fp8core.activation_fit import PairedMoments, asymmetric_error, error_reduction, fit_to_fp8_inputs, fitted_weight
from fp8core.calibration import ArraySource
from fp8core.gptq import fp8_grid, gptq_round_groups
from fp8core.plan import QuantParams, plan_fp8_ops
from fp8core.rewrite import rewrite_to_fp8
from fp8core.runtime import make_session
from fp8core.weight_adjust import linear_ops
from test_bias_shift import K, chain

E4M3_VALUES = np.unique(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64))
E4M3_VALUES = E4M3_VALUES[np.isfinite(E4M3_VALUES)]


def _roundings_near(v: float, scale: float, n: int = 3) -> np.ndarray:
    grid = E4M3_VALUES * scale
    i = int(np.searchsorted(grid, v))
    return grid[max(0, i - n):i + n]


def _direct_error(x, x_fp8, w, q) -> float:
    """``|| X W - X~ Q ||^2`` from the rows themselves (the reference for the moments)."""
    return float(np.sum((x[:, 0] @ w[0] - x_fp8[:, 0] @ q[0]) ** 2))


def test_a_2x2_weight_fit_is_never_worse_than_nearest_and_close_to_the_best_fp8_rounding():
    """Brute force: every combination of the 6 FP8 values around each entry of the fitted weight."""
    scale = 2.0 ** -4
    grid = fp8_grid("F143", np.float32(scale))
    ratios, exact = [], 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        x = (rng.standard_normal((200, 2)) * [1.0, 0.3] + 0.5)[:, None, :]
        x_fp8 = grid(x.astype(np.float32)).astype(np.float64)  # the op's input, rounded as the FP8 model does
        w = rng.standard_normal((1, 2, 2))
        m = PairedMoments(w)
        m.update(x_fp8.transpose(1, 2, 0), x.transpose(1, 2, 0))  # rows as columns, [G, K, R]
        star = fitted_weight(m)
        q = gptq_round_groups(star, m.h_fp8, grid)
        best = min(_direct_error(x, x_fp8, w, np.reshape(c, (1, 2, 2)))
                   for c in itertools.product(*[_roundings_near(v, scale) for v in star.ravel()]))
        e_fit, e_nearest = _direct_error(x, x_fp8, w, q), _direct_error(x, x_fp8, w, grid(w.astype(np.float32)))
        assert e_fit <= e_nearest * (1 + 1e-9), seed
        assert e_fit >= best * (1 - 1e-9), seed  # brute force covers the fit's own choice
        ratios.append(e_fit / best)
        exact += e_fit <= best * 1.01
    assert exact >= 5 and np.mean(ratios) < 1.1, ratios


def test_moments_give_the_error_computed_directly():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 1, 5))
    x_fp8 = x + 0.05 * rng.standard_normal(x.shape)
    w, q1, q2 = (rng.standard_normal((1, 5, 3)) for _ in range(3))
    m = PairedMoments(w)
    fp8_t, float_t = x_fp8.transpose(1, 2, 0), x.transpose(1, 2, 0)  # rows as columns, [G, K, R]
    m.update(fp8_t[..., :40], float_t[..., :40])
    m.update(fp8_t[..., 40:], float_t[..., 40:])  # streamed in two batches
    size = np.sum((x_fp8[:, 0] @ w[0]) ** 2)
    want = (_direct_error(x, x_fp8, w, q1) - _direct_error(x, x_fp8, w, q2)) / size
    assert asymmetric_error(q1, m) - asymmetric_error(q2, m) == pytest.approx(want, rel=1e-9)
    assert error_reduction(q1, q2, m) == pytest.approx(want, rel=1e-9)
    # the refit minimises the error over real weights: no small move of it does better
    star = fitted_weight(m, damp=0.0)
    for _ in range(20):
        moved = star + 1e-3 * rng.standard_normal(star.shape)
        assert _direct_error(x, x_fp8, w, star) <= _direct_error(x, x_fp8, w, moved)


def _held_out_error(model, plans, x):
    reference = make_session(model).run(None, {"x": x})[0].astype(np.float64)
    fp8 = make_session(rewrite_to_fp8(model, plans)).run(None, {"x": x})[0].astype(np.float64)
    return float(np.sum((fp8 - reference) ** 2) / np.sum(reference ** 2))


def test_sequential_fit_lowers_held_out_output_error_below_nearest_and_one_pass():
    model = chain(depth=3)
    before = model.SerializeToString()
    # coarse activations (F143 at 2^-5: steps of 1/64 near 1, saturating at 14): the FP8 inputs
    # differ from the float ones, which a fit to float inputs cannot see
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -5), weight_params=QuantParams("F143", -5))
    rng = np.random.default_rng(1)
    source = ArraySource(Path("c.npz"), {"x": (rng.standard_normal((256, K)) + 1.0).astype(np.float32)})
    held_out = (rng.standard_normal((1024, K)) + 1.0).astype(np.float32)

    ticks = []
    sequential, report = fit_to_fp8_inputs(model, plans, source, batch_size=64, passes=4,
                                           progress=lambda done, total: ticks.append((done, total)))
    assert ticks == [(i, 16) for i in range(1, 17)]  # 4 batches of 64 in each of 4 passes
    one_pass, _ = fit_to_fp8_inputs(model, plans, source, batch_size=64, passes=1)
    assert model.SerializeToString() == before  # the input model is untouched
    assert [r["op"] for r in report] == ["mm_0", "mm_1", "mm_2", "gemm"]
    assert all(r["output_error_reduction"] > 0 for r in report)

    nearest = _held_out_error(model, plans, held_out)
    e_sequential, e_one_pass = _held_out_error(sequential, plans, held_out), _held_out_error(one_pass, plans, held_out)
    assert e_sequential < 0.75 * nearest, (e_sequential, nearest)
    assert e_sequential < e_one_pass, (e_sequential, e_one_pass)


def test_local_fit_needs_one_pass_and_still_beats_nearest():
    model = chain(depth=6)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -5), weight_params=QuantParams("F143", -5))
    rng = np.random.default_rng(1)
    source = ArraySource(Path("c.npz"), {"x": (rng.standard_normal((256, K)) + 1.0).astype(np.float32)})
    held_out = (rng.standard_normal((1024, K)) + 1.0).astype(np.float32)
    local, _ = fit_to_fp8_inputs(model, plans, source, batch_size=64, passes=1, local=True)
    assert _held_out_error(local, plans, held_out) < 0.75 * _held_out_error(model, plans, held_out)


def test_a_pass_holds_at_most_the_budget_of_running_sums():
    """Past the budget the ops wait for another pass, whose FP8 model carries the fits before it."""
    model = chain(depth=3)  # mm_0, mm_1, mm_2, gemm
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -5), weight_params=QuantParams("F143", -5))
    rng = np.random.default_rng(1)
    source = ArraySource(Path("c.npz"), {"x": (rng.standard_normal((256, K)) + 1.0).astype(np.float32)})
    held_out = (rng.standard_normal((1024, K)) + 1.0).astype(np.float32)
    one_op = max(PairedMoments.nbytes(*op.to_groups(numpy_helper.to_array(init)).shape)
                 for op in linear_ops(model, plans) for init in model.graph.initializer if init.name == op.weight)
    ticks = []
    fitted, report = fit_to_fp8_inputs(model, plans, source, batch_size=64, passes=1, local=True, budget=2 * one_op,
                                       progress=lambda done, total: ticks.append((done, total)))
    assert ticks[-1] == (8, 8)  # 2 passes of 4 batches: two ops per pass
    assert [r["op"] for r in report] == ["mm_0", "mm_1", "mm_2", "gemm"]
    assert _held_out_error(fitted, plans, held_out) < 0.75 * _held_out_error(model, plans, held_out)


def test_ops_with_more_inputs_than_the_limit_are_left_at_nearest():
    model = chain(depth=2)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -5), weight_params=QuantParams("F143", -5))
    source = ArraySource(Path("c.npz"), {"x": (np.random.default_rng(2).standard_normal((64, K)) + 1.0).astype(np.float32)})
    fitted, report = fit_to_fp8_inputs(model, plans, source, batch_size=32, passes=1, local=True, max_features=K - 1)
    assert report and all(row["fit"] == f"skipped: {K} inputs > {K - 1}" for row in report)
    assert fitted.SerializeToString() == model.SerializeToString()
    _, fitted_report = fit_to_fp8_inputs(model, plans, source, batch_size=32, passes=1, local=True, max_features=K)
    assert all("fit" not in row for row in fitted_report)


def test_the_fitted_weights_are_on_the_fp8_grid_so_encoding_keeps_them():
    model = chain(depth=2)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -5), weight_params=QuantParams("F143", -5))
    rng = np.random.default_rng(2)
    source = ArraySource(Path("c.npz"), {"x": (rng.standard_normal((128, K)) + 1.0).astype(np.float32)})
    fitted, _ = fit_to_fp8_inputs(model, plans, source, batch_size=32, passes=3)
    grid = fp8_grid("F143", np.float32(2.0 ** -5))
    for init in fitted.graph.initializer:
        if init.name.startswith("w"):
            value = numpy_helper.to_array(init)
            assert np.array_equal(grid(value), value), init.name


def test_ops_with_fewer_rows_than_inputs_get_gptq_weights_but_keep_their_biases():
    """12 rows for K = 16 inputs (fewer rows than inputs, as a squeeze-excitation conv reading one
    pooled row per sample): the mean output shift of so few rows follows their noise (PP-OCRv4 rec
    lost whole lines to such bias shifts), so the biases stay; the weights are still rounded by
    GPTQ with the damped Hessian, which lowers the error on those rows (PP-OCRv4 rec's best CER)."""
    from onnx import numpy_helper

    model = chain(depth=2)
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -5), weight_params=QuantParams("F143", -5))
    rng = np.random.default_rng(4)
    few = ArraySource(Path("c.npz"), {"x": (rng.standard_normal((12, K)) + 1.0).astype(np.float32)})
    enough = ArraySource(Path("c.npz"), {"x": (rng.standard_normal((256, K)) + 1.0).astype(np.float32)})
    weights = {"mm_0": "w0", "mm_1": "w1", "gemm": "wg"}
    for source, many in ((few, False), (enough, True)):
        fitted, report = fit_to_fp8_inputs(model, plans, source, batch_size=32, passes=1, local=True)
        after = {i.name: numpy_helper.to_array(i) for i in fitted.graph.initializer}
        assert all(r["refit"] is many for r in report), report  # 256 rows: >= 4 per input
        assert all(r["output_error_reduction"] >= 0 for r in report), report
        assert sum(r["output_error_reduction"] > 0 for r in report) >= 2, report
        for r in report:
            assert not np.array_equal(after[weights[r["op"]]], original[weights[r["op"]]])  # GPTQ'd
        moved_biases = {n for n in after if n.endswith("_bias_corrected") or n.startswith(("b0_", "b1_", "cg_"))}
        if many:
            assert moved_biases and all("bias" not in r for r in report), report
        else:
            assert not moved_biases and all(r["bias"] == "kept: fewer rows than inputs" for r in report), report
            assert all(np.array_equal(after[b], original[b]) for b in ("b0", "b1", "cg"))


def _moments_both_ways(model, plans, source):
    """The fit's local moments, the FP8 rows rounded in numpy, and the same moments with the FP8
    rows read from the FP8 model's own Q/DQ outputs (the FP8 model as the "float" model of a paired
    pass: its op inputs before their Q/DQ)."""
    from fp8core.activation_fit import _paired_moments, input_rounding
    from fp8core.model import Model

    ops = linear_ops(model, plans)
    fp8 = Model(rewrite_to_fp8(model, plans))
    reads = {n.name: n.input[0] for n in fp8.graph.node if n.input}
    rounding = input_rounding(plans)
    weights = {op.name: op.to_groups(numpy_helper.to_array(next(t for t in model.graph.initializer
                                                                if t.name == op.weight))).astype(np.float32)
               for op in ops}
    local = _paired_moments(None, fp8, ops, weights, reads, rounding, source, 8)
    fetched = _paired_moments(fp8, fp8, ops, weights, reads, rounding, source, 8)
    return ops, local, fetched


@pytest.mark.parametrize("case", ["matmul chain", "depthwise conv", "strided conv", "fp16 conv"])
def test_fp8_rows_rounded_here_are_the_fp8_models_own(case):
    """The fit rounds each op's input itself instead of fetching its Q/DQ output from onnxruntime:
    the moments must be the same, bit for bit (saturation included: scales small enough to clip)."""
    from test_conv_adjust import _case, _conv_model

    rng = np.random.default_rng(4)
    if case == "matmul chain":
        model = chain(depth=3)
        x = (rng.standard_normal((24, K)) * 3 + 1.0).astype(np.float32)
    else:
        w, x, spatial, attrs = _case("depthwise" if case == "depthwise conv" else "strided padded")
        x = np.concatenate([x] * 8) * 4
        model = _conv_model(w, None, spatial, attrs)
        if case == "fp16 conv":  # float16 input, weight and Q/DQ scales
            model = _conv_model(w.astype(np.float16), None, spatial, attrs, np.float16)
            x = x.astype(np.float16)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -6), weight_params=QuantParams("F143", -5))
    ops, local, fetched = _moments_both_ways(model, plans, ArraySource(Path("c.npz"), {"x": x}))
    assert ops
    for op in ops:
        a, b = local[op.name], fetched[op.name]
        assert a.count == b.count > 0
        for name in ("h_fp8", "cross_w", "sum_fp8", "sum_float"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), (op.name, name)


def _chain_in_if(depth=4):
    """``If(max(x) > -1e30)``: the then branch is :func:`chain` (weights as Constant nodes of the
    branch, as exporters write silero VAD), the else branch a chain of other weights that no
    sample takes. Both read ``x`` from the main graph."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    from fp8core.rewrite import prepare_model

    def branch(seed, prefix):
        g = chain(depth=depth, seed=seed).graph
        rename = {t.name: prefix + t.name for t in g.initializer}
        rename.update({o: prefix + o for n in g.node for o in n.output})
        nodes = [h.make_node("Constant", [], [rename[t.name]], name=prefix + t.name + "_const", value=t)
                 for t in g.initializer]
        for n in g.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.name = prefix + n.name
            copy.input[:] = [rename.get(i, i) for i in n.input]
            copy.output[:] = [rename[o] for o in n.output]
            nodes.append(copy)
        return h.make_graph(nodes, prefix + "branch", [], [h.make_tensor_value_info(prefix + "y", T.FLOAT, None)])

    nodes = [h.make_node("ReduceMax", ["x"], ["top"], keepdims=0, name="top"),
             h.make_node("Greater", ["top", "floor"], ["cond"], name="cond"),
             h.make_node("If", ["cond"], ["y"], name="if", then_branch=branch(0, "t_"), else_branch=branch(1, "e_"))]
    graph = h.make_graph(nodes, "chain_in_if", [h.make_tensor_value_info("x", T.FLOAT, ["N", K])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])],
                         [numpy_helper.from_array(np.array(-1e30, np.float32), "floor")])
    return prepare_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]), 21)


def test_ops_inside_if_branches_are_fitted_and_the_branch_no_sample_takes_is_left_as_it_is():
    """silero VAD's whole network sits in the branches of an If on the sample rate: the fit reaches
    the branch the data takes (its values exposed, empty in runs that took the other), writes
    its Constants and biases, and leaves the other branch's weights alone."""
    model = _chain_in_if()
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -5), weight_params=QuantParams("F143", -5))
    assert {p.name for p in plans if p.fp8} >= {"t_mm_0", "e_mm_0", "t_gemm"}
    assert {op.name for op in linear_ops(model, plans)} == set()  # GPTQ / bias correction: top level only
    rng = np.random.default_rng(1)
    source = ArraySource(Path("c.npz"), {"x": (rng.standard_normal((256, K)) + 1.0).astype(np.float32)})
    held_out = (rng.standard_normal((1024, K)) + 1.0).astype(np.float32)
    fitted, report = fit_to_fp8_inputs(model, plans, source, batch_size=64, passes=1, local=True)
    # t_mm_0 and e_mm_0 read x, a value of the main graph, whichever branch runs: left as they are
    assert [r["op"] for r in report] == ["t_mm_1", "t_mm_2", "t_mm_3", "t_gemm"]
    assert all(r["output_error_reduction"] > 0 and "bias_max_shift" in r for r in report)
    assert _held_out_error(fitted, plans, held_out) < 0.9 * _held_out_error(model, plans, held_out)
    # each op corrects its own rounding on the rows it reads: the same chain in the main graph
    # gets the same weights and biases, bit for bit
    flat = chain(depth=4)
    flat_fitted, _ = fit_to_fp8_inputs(flat, plan_fp8_ops(flat, activation_params=QuantParams("F143", -5),
                                                          weight_params=QuantParams("F143", -5)),
                                       source, batch_size=64, passes=1, local=True)
    flat_values = {t.name: numpy_helper.to_array(t) for t in flat_fitted.graph.initializer}
    branch_biases = {t.name: numpy_helper.to_array(t) for t in fitted.graph.initializer if t.name != "floor"}
    assert sorted(branch_biases) == ["t_b1_bias_corrected", "t_b2_bias_corrected", "t_b3_bias_corrected",
                                     "t_cg_bias_corrected"]
    for name, value in branch_biases.items():
        np.testing.assert_array_equal(value, flat_values[name[2:]])

    def constants(m, prefix):
        [body] = [a.g for a in m.graph.node[2].attribute if a.name == ("then_branch" if prefix == "t_" else "else_branch")]
        return {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in body.node if n.op_type == "Constant"}
    for name, value in constants(model, "e_").items():
        np.testing.assert_array_equal(constants(fitted, "e_")[name], value)
    np.testing.assert_array_equal(constants(fitted, "t_")["t_w0"], constants(model, "t_")["t_w0"])
    for name in ("t_w1", "t_w2", "t_w3", "t_wg"):
        np.testing.assert_array_equal(constants(fitted, "t_")[name], flat_values[name[2:]])
        assert not np.array_equal(constants(fitted, "t_")[name], constants(model, "t_")[name])
