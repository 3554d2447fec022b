"""fp8core.fallback: measured sensitivity, K kept ops and the accuracy target pick the ops known to matter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from fp8core import fallback as fallback_module
from fp8core.calibration import ArraySource
from fp8core.compare import compare_models
from fp8core.fallback import (
    NEGLIGIBLE_SNR,
    DOMINANCE_MAX_KEPT,
    AccuracyTarget,
    FallbackError,
    OutputProbe,
    Trials,
    fallback_for_target,
    find_dominant_ops,
    keep_dominant_ops,
    keep_most_sensitive,
    keep_ops,
    keep_worst_ops,
    measure_sensitivity,
    op_losses_from_comparison,
    worst_ops,
)
from fp8core.plan import QuantParams, plan_fp8_ops
from fp8core.rewrite import prepare_model, rewrite_to_fp8
from tests.models import cancelling_branches, outlier_branches, outlier_chain

BAD_OP = "mm_2"
SIZE = 16


def chain_with_outlier(depth=4, bad=2, seed=0):
    """x -> (MatMul -> Relu) * depth: weights ~ N(0, 1/sqrt(16)) except one entry of 40 in op ``bad``.

    At weight scale -4 (F143 max 240 * 2^-4 = 15) every ordinary weight fits with 3 mantissa bits
    (activations at scale 0: max 240, so the large activations after the outlier still fit)
    but the outlier saturates to 15: that op's output is off by 25 * x_i on one column.
    """
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    prev = "x"
    for i in range(depth):
        w = (rng.standard_normal((SIZE, SIZE)) / np.sqrt(SIZE)).astype(np.float32)
        if i == bad:
            w[3, 5] = 40.0
        inits.append(nh.from_array(w, f"w{i}"))
        nodes.append(h.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm_{i}"))
        out = "y" if i == depth - 1 else f"r{i}"
        nodes.append(h.make_node("Relu", [f"m{i}"], [out], name=f"relu_{i}"))
        prev = out
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, ["N", SIZE])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", SIZE])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    return model


def setup(samples=24):
    model = prepare_model(chain_with_outlier(), 21)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", 0), weight_params=QuantParams("F143", -4))
    x = np.random.default_rng(1).standard_normal((samples, SIZE)).astype(np.float32)
    return model, plans, ArraySource(Path("x.npz"), {"x": x})


def test_keep_k_worst_by_comparison_keeps_the_op_with_the_outlier():
    model, plans, source = setup()
    report = compare_models(model, rewrite_to_fp8(model, plans), plans, source, batch_size=8)
    losses = op_losses_from_comparison(report)
    others = [v for k, v in losses.items() if k != BAD_OP]
    assert losses[BAD_OP] > 10 * max(others)  # the model is built so: one op much worse
    # the raw output snr would blame the op after it too (errors propagate): added_snr does not
    raw = op_losses_from_comparison(report, "snr")
    assert raw["mm_3"] > raw[BAD_OP] and worst_ops(plans, raw, 1) == ["mm_3"]
    kept_plans, kept = keep_worst_ops(plans, losses, 1, "precision_compare snr")
    assert kept == [BAD_OP]
    by_name = {p.name: p for p in kept_plans}
    assert not by_name[BAD_OP].fp8 and "num_of_layers_keep_fp16" in by_name[BAD_OP].reason
    assert all(q.params is None for q in by_name[BAD_OP].inputs)
    assert sum(p.fp8 for p in kept_plans) == 3
    assert plans[2].fp8  # the input plans are not modified
    # keeping it really removes most of the output error
    after = compare_models(model, rewrite_to_fp8(model, kept_plans), kept_plans, source, batch_size=8)
    assert after.output_metric("snr") < report.output_metric("snr") / 10


def test_worst_ops_order_ties_and_bounds():
    model, plans, _ = setup()
    losses = {"mm_0": 1.0, "mm_1": 3.0, "mm_2": 3.0, "mm_3": float("nan")}
    assert worst_ops(plans, losses, 3) == ["mm_3", "mm_1", "mm_2"]  # NaN worst, ties by graph order
    assert worst_ops(plans, losses, 0) == []
    assert worst_ops(plans, losses, 10) == ["mm_3", "mm_1", "mm_2", "mm_0"]
    with pytest.raises(FallbackError, match="whole number >= 0"):
        worst_ops(plans, losses, -1)
    with pytest.raises(FallbackError, match="no loss for FP8 op"):
        worst_ops(plans, {"mm_0": 1.0}, 1)
    with pytest.raises(FallbackError, match="not an FP8 op"):
        keep_ops(plans, ["relu_0"], "x")


def test_accuracy_target_keeps_the_bad_op_first_and_stops_when_met():
    model, plans, source = setup()
    probe = OutputProbe(model, source, batch_size=8, max_samples=16)
    all_fp8 = probe.measure(rewrite_to_fp8(model, plans))["cos_dist"]
    without_bad = probe.measure(rewrite_to_fp8(model, keep_ops(plans, [BAD_OP], "t")))["cos_dist"]
    target = (all_fp8 * without_bad) ** 0.5  # between the two: one op is enough, none is not
    steps = []
    result = fallback_for_target(model, plans, source, f"cos_dist={target}", batch_size=8, max_samples=16,
                                 progress=steps.append)
    assert result.met and result.kept == [BAD_OP]
    assert [s.phase for s in steps[:2]] == ["all FP8", "all kept"] and steps[0].metric == pytest.approx(all_fp8)
    assert result.sensitivity.ranked()[0] == BAD_OP
    assert result.sensitivity.samples == 8  # measured on the first 8 of the 16 samples
    eight = OutputProbe(model, source, batch_size=8, max_samples=8)
    assert result.sensitivity.alone[BAD_OP] == pytest.approx(
        eight.measure(rewrite_to_fp8(model, keep_ops(plans, [BAD_OP], "t")))["cos_dist"])
    assert set(result.sensitivity.alone) == {"mm_0", "mm_1", "mm_2", "mm_3"}
    bisect = [s for s in steps if s.phase == "bisect"]
    assert bisect and bisect[-1].kept == [BAD_OP] or any(s.kept == [BAD_OP] and s.met for s in bisect)
    assert [p.name for p in result.plans if not p.fp8] == [BAD_OP]
    assert "met keeping 1 op" in result.message and BAD_OP in result.format_log()
    assert result.to_dict()["kept"] == [BAD_OP] and result.to_dict()["sensitivity"]["ops"][0]["name"] == BAD_OP


def test_accuracy_target_met_by_all_fp8_keeps_nothing_and_a_strict_one_keeps_more():
    model, plans, source = setup()
    loose = fallback_for_target(model, plans, source, "cos_dist=0.5", max_samples=8)
    assert loose.met and loose.kept == [] and len(loose.steps) == 1
    strict = fallback_for_target(model, plans, source, "snr_db=200", max_samples=8)
    assert strict.met and strict.kept[0] == BAD_OP and len(strict.kept) == 4  # only all-float is exact
    assert strict.steps[1].phase == "all kept" and strict.steps[1].metric == float("inf")


def test_accuracy_target_that_cannot_be_met_says_so_and_keeps_nothing():
    model, plans, source = setup()
    result = fallback_for_target(model, plans, source, "cos_dist=0", max_samples=8, candidates=["mm_0", "mm_1"])
    assert not result.met and result.kept == []
    assert "cannot be met: even with all 2 candidate ops in original precision" in result.message
    assert all(p.fp8 for p in result.plans)
    capped = fallback_for_target(model, plans, source, "cos_dist=0", max_samples=8, max_keep=2)
    assert not capped.met and len(capped.kept) == 2 and capped.kept[0] == BAD_OP
    assert "not met keeping the 2 most helpful op(s)" in capped.message


def two_paths(seed=0):
    """y = x @ w_main + 1e-4 * (x @ w_side): the side MatMul has a weight outlier that saturates
    (by far the largest noise an op adds itself) but hardly reaches the output; the main MatMul
    is quantized cleanly yet carries all of the output. Measured effect must pick the main one."""
    rng = np.random.default_rng(seed)
    w_main = (rng.standard_normal((SIZE, SIZE)) / np.sqrt(SIZE)).astype(np.float32)
    w_side = (rng.standard_normal((SIZE, SIZE)) / np.sqrt(SIZE)).astype(np.float32)
    w_side[3, 5] = 40.0
    nodes = [h.make_node("MatMul", ["x", "w_main"], ["m"], name="mm_main"),
             h.make_node("MatMul", ["x", "w_side"], ["s"], name="mm_side"),
             h.make_node("Mul", ["s", "tiny"], ["s_small"], name="scale_side"),
             h.make_node("Add", ["m", "s_small"], ["y"], name="add")]
    graph = h.make_graph(nodes, "two_paths", [h.make_tensor_value_info("x", T.FLOAT, ["N", SIZE])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", SIZE])],
                         [nh.from_array(w_main, "w_main"), nh.from_array(w_side, "w_side"),
                          nh.from_array(np.array(1e-4, np.float32), "tiny")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])


def test_sensitivity_finds_the_op_that_matters_where_per_op_noise_does_not():
    model = prepare_model(two_paths(), 21)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", 0), weight_params=QuantParams("F143", -4))
    x = np.random.default_rng(1).standard_normal((24, SIZE)).astype(np.float32)
    source = ArraySource(Path("x.npz"), {"x": x})
    report = compare_models(model, rewrite_to_fp8(model, plans), plans, source, batch_size=8)
    assert worst_ops(plans, op_losses_from_comparison(report), 1) == ["mm_side"]  # the noisy op

    probe = OutputProbe(model, source, batch_size=8)
    sensitivity = measure_sensitivity(Trials(model, plans, probe), ["mm_main", "mm_side"])
    assert sensitivity.ranked() == ["mm_main", "mm_side"]
    assert sensitivity.gain("mm_main") > 0.9 * sensitivity.all_fp8  # keeping it removes nearly all the noise
    kept_plans, kept = keep_most_sensitive(plans, sensitivity, 1)
    assert kept == ["mm_main"] and [p.name for p in kept_plans if not p.fp8] == ["mm_main"]
    after = probe.measure(rewrite_to_fp8(model, kept_plans))["snr"]
    assert after < 0.1 * sensitivity.all_fp8  # what is left is the side path's, within FP8 noise of 1e-4 x
    # with two ops, one of them carrying most of the noise is no outlier: no dominance search
    assert find_dominant_ops(Trials(model, plans, probe), ["mm_main", "mm_side"], 0.5).found == {}


def test_group_testing_finds_the_one_dominant_op_of_many_in_few_trials():
    """A 16-op chain where op 11 alone carries most of the output noise (a saturating outlier
    weight): found with about 2 log2(16) trials; a chain where no op dominates: nothing, fast."""
    x = np.random.default_rng(1).standard_normal((16, SIZE)).astype(np.float32)
    source = ArraySource(Path("x.npz"), {"x": x})
    for bad, expected in ((11, ["mm_11"]), (None, [])):
        model = prepare_model(outlier_chain(16, bad, SIZE), 21)
        plans = plan_fp8_ops(model, activation_params=QuantParams("F143", 0), weight_params=QuantParams("F143", -4))
        trials = Trials(model, plans, OutputProbe(model, source, batch_size=8))
        dominance = find_dominant_ops(trials, [p.name for p in plans if p.fp8], 0.5)
        assert list(dominance.found) == expected, dominance
        # one op at a time: 17 trials on 8 samples; here groups on 4, and on 8 only the baseline
        # and each single op
        assert dominance.trials <= 2 * 4 + 2, dominance.trials
        assert (dominance.samples, dominance.group_samples) == (8, 4)
        # keeping every op is the original model: never measured
        assert frozenset(p.name for p in plans if p.fp8) not in trials._seen
        if bad is not None:  # what the search says is what keeping it alone measures
            alone = measure_sensitivity(trials, ["mm_11"])
            assert dominance.found["mm_11"] == pytest.approx(alone.gain("mm_11") / alone.all_fp8)
            assert find_dominant_ops(trials, [p.name for p in plans if p.fp8], 1.0).found == {}
            kept = keep_dominant_ops(plans, dominance)
            assert [p.name for p in kept if not p.fp8] == ["mm_11"]
            assert "--keep_dominant_share 0.5" in next(p.reason for p in kept if p.name == "mm_11")
            with pytest.raises(FallbackError, match="keep_dominant_share"):
                find_dominant_ops(trials, ["mm_11"], 1.5)


def _switchable(raw: onnx.ModelProto):
    """The model prepared, planned at fixed params (F143, activations scale 0, weights -4) and one
    switchable session probed on 16 standard-normal samples; the FP8 ops' names."""
    x = np.random.default_rng(1).standard_normal((16, SIZE)).astype(np.float32)
    source = ArraySource(Path("x.npz"), {"x": x})
    model = prepare_model(raw, 21)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", 0), weight_params=QuantParams("F143", -4))
    return model, plans, source, Trials(model, plans, OutputProbe(model, source, batch_size=8)), \
        [p.name for p in plans if p.fp8]


def test_dominance_keeps_at_most_three_ops_those_with_the_largest_shares(monkeypatch):
    """Four branches of a sum each carry a part of the output noise (14-54%), all above a share of
    0.1: the three largest are kept, each share is what keeping that op alone measures, and the
    best-first search stops there (the fourth costs no trial of its own)."""
    model, plans, source, trials, candidates = _switchable(outlier_branches())
    alone = measure_sensitivity(trials, candidates)
    shares = {n: alone.gain(n) / alone.all_fp8 for n in candidates}
    above = sorted((n for n in candidates if shares[n] >= 0.1), key=lambda n: -shares[n])
    assert above == ["mm_8", "mm_6", "mm_4", "mm_1"] and DOMINANCE_MAX_KEPT == 3
    fresh = lambda: Trials(model, plans, OutputProbe(model, source, batch_size=8))  # noqa: E731 (nothing remembered)
    dominance = find_dominant_ops(fresh(), candidates, 0.1)
    assert list(dominance.found) == above[:3] and "mm_1" not in dominance.passed_over
    assert all(dominance.found[n] == pytest.approx(shares[n]) for n in above[:3])
    monkeypatch.setattr(fallback_module, "DOMINANCE_MAX_KEPT", 10)  # a search that takes all four
    every = find_dominant_ops(fresh(), candidates, 0.1)
    assert list(every.found) == above and every.trials > dominance.trials
    assert [p.name for p in keep_dominant_ops(plans, dominance) if not p.fp8] == ["mm_4", "mm_6", "mm_8"]
    # at a share of one half only the largest qualifies, and nothing is passed over
    half = find_dominant_ops(trials, candidates, 0.5)
    assert list(half.found) == ["mm_8"] and half.passed_over == {}


def test_each_op_measured_alone_finds_the_op_that_cancelling_errors_hide_from_groups():
    """Two ops whose FP8 errors cancel, one in each half of the graph: keeping either half in
    original precision lets the other's error through, so group testing drops both halves and keeps
    nothing, while the op that carries 98% of the noise alone is found when each op is measured
    alone (one trial per op)."""
    _, _, _, trials, candidates = _switchable(cancelling_branches())
    assert candidates[:2] == ["mm_a", "mm_b"] and candidates[-1] == "mm_c" and len(candidates) == 8
    alone = measure_sensitivity(trials, candidates)
    assert alone.gain("mm_a") > 0.9 * alone.all_fp8 and alone.gain("mm_b") < 0 and alone.gain("mm_c") < 0
    groups = find_dominant_ops(trials, candidates, 0.15)
    assert groups.found == {} and groups.method == "groups"
    singles = find_dominant_ops(trials, candidates, 0.15, one_by_one=True)
    assert list(singles.found) == ["mm_a"] and singles.method == "singles" and singles.passed_over == {}
    assert singles.found["mm_a"] == pytest.approx(alone.gain("mm_a") / alone.all_fp8)
    assert singles.trials == len(candidates) + 1 and singles.to_dict()["method"] == "singles"


def test_the_fallback_measures_each_op_alone_when_its_trials_are_cheap(tmp_path):
    """pipeline.fallback takes the one-by-one search when candidates x FP8 activation values per
    sample (Calibrated.activation_values: here 8 ops x 16 values) is within
    DOMINANCE_SINGLES_BUDGET, group testing above it or when the cost is unknown."""
    from fp8core.model import Model
    from fp8core.pipeline import CalibrateConfig, FallbackConfig, calibrate, fallback

    x = np.random.default_rng(1).standard_normal((16, SIZE)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    model = Model.of(prepare_model(cancelling_branches(), 21))
    plans = plan_fp8_ops(model.proto, activation_params=QuantParams("F143", 0),
                         weight_params=QuantParams("F143", -4))
    calibrated = calibrate(model, plans, ArraySource(tmp_path / "x.npz", {"x": x}), CalibrateConfig(8))
    assert calibrated.activation_values == 8 * SIZE
    config = FallbackConfig(data=str(tmp_path / "x.npz"), batch_size=8, keep_dominant=True)
    cheap = fallback(model, calibrated.plans, config, folder=str(tmp_path), activation_values=8 * SIZE)
    assert cheap.tags["dominant_search"] == "singles" and list(cheap.dominance.found) == ["mm_a"]
    assert [p.name for p in cheap.plans if not p.fp8] == ["mm_a"]
    budget = fallback_module.DOMINANCE_SINGLES_BUDGET
    for values in (None, budget / 8 + 1):
        costly = fallback(model, calibrated.plans, config, folder=str(tmp_path), activation_values=values)
        assert costly.tags["dominant_search"] == "groups" and costly.dominance.found == {}


def test_the_library_pipeline_chooses_the_dominance_search_as_the_cli_does(tmp_path):
    """pipeline.convert hands the fallback the calibration's activation values, as the flow does:
    without them it took group testing where the CLI measured every op alone (another model)."""
    from fp8core import pipeline
    from tasks.params import ConvertParams

    x = np.random.default_rng(1).standard_normal((16, SIZE)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    onnx.save(cancelling_branches(), tmp_path / "m.onnx")
    conversion = pipeline.convert(ConvertParams(input_model=str(tmp_path / "m.onnx"), output_model=str(tmp_path / "o.onnx"),
                                                quantize=True, data_preprocess=str(tmp_path / "x.npz"), batch_size=8))
    assert conversion.tags["dominant_search"] == "singles"


def test_models_with_large_samples_are_searched_on_fewer_of_them():
    """A trial runs at most DOMINANCE_TRIAL_VALUES FP8 activation values: small samples keep 8 and
    4, a 800x608 page (5.1e7 values) 3 and 3, anything larger at least 2."""
    from fp8core.fallback import DOMINANCE_GROUP_SAMPLES, DOMINANCE_TRIAL_VALUES, SENSITIVITY_SAMPLES, dominance_samples

    assert dominance_samples(None) == dominance_samples(0) == (SENSITIVITY_SAMPLES, DOMINANCE_GROUP_SAMPLES)
    assert dominance_samples(1.6e7) == (8, 4)
    assert dominance_samples(5.1e7) == (3, 3)
    assert dominance_samples(1e12) == (2, 2)
    for values in np.geomspace(1e3, 1e10, 50):
        samples, groups = dominance_samples(values)
        assert groups <= samples and (samples * values <= DOMINANCE_TRIAL_VALUES or samples == 2)


def test_groups_are_measured_on_samples_that_show_the_noise():
    """The 16-op chain with op 11 dominating, its first 4 calibration samples zero: those show no
    FP8 noise at all, so the groups that narrow the search down are measured on the 8 samples the
    single ops are (before: the search stopped at its 4-sample baseline and kept nothing)."""
    x = np.random.default_rng(1).standard_normal((16, SIZE)).astype(np.float32)
    x[:4] = 0
    source = ArraySource(Path("x.npz"), {"x": x})
    model = prepare_model(outlier_chain(16, 11, SIZE), 21)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", 0), weight_params=QuantParams("F143", -4))
    trials = Trials(model, plans, OutputProbe(model, source, batch_size=8))
    assert trials.on_first(4).metrics([])["logit_snr"] == 0 < trials.on_first(8).metrics([])["logit_snr"]
    dominance = find_dominant_ops(trials, [p.name for p in plans if p.fp8], 0.5)
    assert list(dominance.found) == ["mm_11"] and dominance.group_samples == 8, dominance
    assert dominance.all_fp8 == trials.on_first(8).metrics([])["logit_snr"]


def test_negligible_output_noise_is_not_searched():
    """The same chain with op 11 dominating, its output shifted by 1e4: the noise is now 1e-9 of
    the signal (no FP8 error worth an op in float), so the search stops after the baseline."""
    x = np.random.default_rng(1).standard_normal((16, SIZE)).astype(np.float32)
    source = ArraySource(Path("x.npz"), {"x": x})
    raw = outlier_chain(16, 11, SIZE)
    last = raw.graph.node[-1]
    last.output[0] = "y0"
    raw.graph.initializer.append(onnx.numpy_helper.from_array(np.full(SIZE, 1e4, np.float32), "shift"))
    raw.graph.node.append(onnx.helper.make_node("Add", ["y0", "shift"], ["y"], name="shift_add"))
    model = prepare_model(raw, 21)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", 0), weight_params=QuantParams("F143", -4))
    dominance = find_dominant_ops(Trials(model, plans, OutputProbe(model, source, batch_size=8)),
                                  [p.name for p in plans if p.fp8], 0.5)
    assert 0 < dominance.all_fp8 < NEGLIGIBLE_SNR and dominance.found == {} and dominance.trials == 1


def test_ops_are_measured_on_the_logits_of_a_saturated_softmax():
    """The dominant-op chain with a confident Softmax on top (opset 11 over [N, 4, 4]: an upgrade
    wraps it in Flatten ... Reshape), then a Reshape and an Identity: the probabilities barely move under FP8 noise (the
    outputs' snr is negligible) but their logits do, so the search still finds op 11 by the
    logits; the target metrics stay the outputs' own."""
    x = np.random.default_rng(1).standard_normal((16, SIZE)).astype(np.float32)
    source = ArraySource(Path("x.npz"), {"x": x})
    raw = outlier_chain(16, 11, SIZE, opset=11)
    raw.graph.node[-1].output[0] = "r_last"
    confident = np.zeros(SIZE, np.float32)
    confident[0] = 40.0  # class 0 wins by e^40 whatever the noise: its probability is 1 in float32
    raw.graph.initializer.extend([nh.from_array(confident, "confidence"), nh.from_array(np.array(1e3, np.float32), "gain"),
                                  nh.from_array(np.array([-1, 4, 4]), "square"), nh.from_array(np.array([-1, SIZE]), "flat")])
    raw.graph.node.extend([h.make_node("Mul", ["r_last", "gain"], ["r_big"], name="gain"),  # the chain's outputs are ~1e-3
                           h.make_node("Add", ["r_big", "confidence"], ["scores"], name="sharpen"),
                           h.make_node("Reshape", ["scores", "square"], ["scores3"], name="to_3d"),
                           h.make_node("Softmax", ["scores3"], ["probs3"], name="softmax", axis=1),
                           h.make_node("Reshape", ["probs3", "flat"], ["probs"], name="to_2d"),
                           h.make_node("Identity", ["probs"], ["y"], name="out")])
    model = prepare_model(raw, 21)
    assert [n.op_type for n in model.graph.node][-5:] == ["Flatten", "Softmax", "Reshape", "Reshape", "Identity"]
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", 0), weight_params=QuantParams("F143", -4))
    probe = OutputProbe(model, source, batch_size=8)
    assert probe.logit_names == [next(n.input[0] for n in model.graph.node if n.op_type == "Softmax")]
    metrics = probe.measure(rewrite_to_fp8(model, plans))
    assert metrics["snr"] < NEGLIGIBLE_SNR < metrics["logit_snr"], metrics
    dominance = find_dominant_ops(Trials(model, plans, probe), [p.name for p in plans if p.fp8], 0.5)
    assert dominance.metric == "logit_snr" and list(dominance.found) == ["mm_11"], dominance
    # the same search on the probabilities sees nothing to remove
    assert find_dominant_ops(Trials(model, plans, probe), [p.name for p in plans if p.fp8], 0.5,
                             metric="snr").found == {}


def test_bisection_keeps_exactly_the_two_planted_ops():
    """Two outlier ops (mm_1, mm_3) of a 5-op chain: the target lies between keeping both and
    keeping either one, so the only answer with two ops is {mm_1, mm_3}; the search must find
    it with fewer trials than a greedy search (candidates x kept)."""
    rng = np.random.default_rng(3)
    inits, nodes, prev = [], [], "x"
    for i in range(5):
        w = (rng.standard_normal((SIZE, SIZE)) / np.sqrt(SIZE)).astype(np.float32)
        if i in (1, 3):
            w[2 * i, 5] = 40.0
        inits.append(nh.from_array(w, f"w{i}"))
        nodes.append(h.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm_{i}"))
        out = "y" if i == 4 else f"r{i}"
        nodes.append(h.make_node("Relu", [f"m{i}"], [out], name=f"relu_{i}"))
        prev = out
    graph = h.make_graph(nodes, "chain5", [h.make_tensor_value_info("x", T.FLOAT, ["N", SIZE])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", SIZE])], inits)
    model = prepare_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]), 21)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", 0), weight_params=QuantParams("F143", -4))
    x = np.random.default_rng(1).standard_normal((24, SIZE)).astype(np.float32)
    source = ArraySource(Path("x.npz"), {"x": x})
    probe = OutputProbe(model, source, batch_size=8)

    def snr(kept):
        return probe.measure(rewrite_to_fp8(model, keep_ops(plans, kept, "t")))["snr"]

    both, one = snr(["mm_1", "mm_3"]), min(snr(["mm_1"]), snr(["mm_3"]))
    assert both < one / 4
    result = fallback_for_target(model, plans, source, f"snr={(both * one) ** 0.5}", batch_size=8)
    assert result.met and sorted(result.kept) == ["mm_1", "mm_3"]
    # sensitivity (5 ops + all FP8), both ends, bisection (log2 5), pruning (2), the final check;
    # each a run of the samples on one session (a greedy search rewrote the model for each of its
    # 1 + 1 + 5 + 4 trials)
    assert result.trials <= 6 + 2 + 3 + 2 + 1



@pytest.mark.parametrize("text, message", [
    ("cos_dist", "expected METRIC=VALUE"),
    ("=0.1", "expected METRIC=VALUE"),
    ("accuracy=0.9", "unknown metric 'accuracy'"),
    ("cos_dist=abc", "'abc' is not a number"),
    ("mse=-1", "never negative"),
    ("top1_agreement=1.5", "fraction"),
    ("snr_db=inf", "finite number"),
])
def test_bad_accuracy_targets_give_one_line_errors(text, message):
    with pytest.raises(FallbackError, match=message) as info:
        AccuracyTarget.parse(text)
    assert "\n" not in str(info.value)


def test_target_parsing_and_direction():
    t = AccuracyTarget.parse(" COS_DIST = 1e-3 ")
    assert (t.metric, t.value, t.met(0.001), t.met(0.0011)) == ("cos_dist", 0.001, True, False)
    a = AccuracyTarget.parse("top1_agreement=0.99")
    assert a.higher_is_better and a.met(0.995) and not a.met(float("nan"))


def test_fallback_trials_reuse_the_encoded_weights(monkeypatch):
    # rewrite_to_fp8 takes the entries it copies out of the dict it gets; every trial used to
    # re-encode every weight after the first one consumed them.
    import fp8core.rewrite as rewrite

    model, plans, source = setup()
    calls = []
    real_encode = rewrite.encode
    monkeypatch.setattr(rewrite, "encode", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    fallback_for_target(model, plans, source, "snr_db=200", batch_size=8, max_samples=8)  # many trials
    weights = {q.tensor for p in plans if p.fp8 for q in p.input("weight") if q.params is not None}
    assert len(calls) == len(weights)


@pytest.mark.parametrize("kind", ["float16_cnn", "loop_body_matmul", "if_branches"])
def test_one_switchable_session_measures_what_a_rewrite_with_kept_ops_gives(kind):
    """Trials run one model whose FP8 ops each read Where(flag, original, dequantized); any set of
    flags must give the metrics of the model rewritten with those ops kept (bodies, FP16 too)."""
    from tests import real_graphs

    float_model, data = real_graphs.ALL[kind]()
    model = prepare_model(float_model, 21)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -2), weight_params=QuantParams("F143", -4))
    names = [p.name for p in plans if p.fp8]
    assert names, kind
    source = ArraySource(Path("d.npz"), data)
    probe = OutputProbe(model, source, batch_size=6)
    trials = Trials(model, plans, probe)
    for kept in ([], names[:1], names[-1:], names):
        want = probe.measure(rewrite_to_fp8(model, keep_ops(plans, kept, "t")))
        assert trials.exact_metrics(kept) == want
        got = trials.metrics(kept)
        # to rounding: onnxruntime's optimizer may fuse FP16 ops differently around the switches
        for metric in ("mse", "snr", "cos_dist", "top1_agreement"):
            assert got[metric] == pytest.approx(want[metric], rel=1e-3, abs=1e-9), (kind, kept, metric)
    assert trials.exact_metrics(names)["snr"] == 0 and trials.metrics([])["snr"] > 1e-6
