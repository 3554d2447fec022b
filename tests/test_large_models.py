"""Models with external data (the form every model past 2 GiB has), on small models forced to it.

* input: a model saved with ``save_as_external_data`` loads (weights read into the proto, or left
  on disk and read one at a time while encoding) and converts to the same FP8 bytes as the
  inline model;
* output: ``external_data="always"`` writes ``<name>.<sha256[:16]>.data`` beside the model, which
  passes ``check_model(path, full_check=True)`` and runs in onnxruntime with the same outputs as
  the inline FP8 model; ``auto`` decides by size; ``never`` refuses what cannot fit in one file;
* damaged external data (missing, truncated, pointing outside the folder) is a ModelError.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import fp8core.modelio as modelio
from fp8core import pipeline
from fp8core.graph import ModelError, external_tensors, load_model
from fp8core.modelio import OutputError, save_model_atomic, validate_fp8_model, wants_external_data
from fp8core.plan import QuantParams, plan_fp8_ops
from fp8core.rewrite import encode_weights, prepare_model, rewrite_to_fp8
from fp8core.runtime import make_session
from models import cnn, matmul_chain

P = QuantParams("F143", -3)


def _save_external(model: onnx.ModelProto, path) -> None:
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)


def _convert(path, load_weights=True, external_data="never", out=None):
    """Fast mode through the library pipeline (fp8core.pipeline, as the CLI runs it): load (weights
    left on disk unless ``load_weights``), plan, then to_fp8 into ``out`` (encode, rewrite,
    validate, save). Without ``out``: the FP8 model in memory."""
    loaded = pipeline.load(str(path), pipeline.LoadConfig(stream_weights=not load_weights))
    plans = pipeline.plan(loaded.model, pipeline.PlanConfig("fp8", (), P, P)).plans
    if out is not None:
        return pipeline.to_fp8(loaded, plans, pipeline.ToFP8Config(str(out), external_data, keep_model=False))
    encoded = encode_weights(loaded.model, plans)
    fp8 = rewrite_to_fp8(loaded.model, plans, encoded)
    assert not encoded, "rewrite consumes the encoded weights (held once)"
    return fp8


@pytest.fixture
def chain_paths(tmp_path):
    model = matmul_chain(size=256, depth=3)  # 256 KiB weights: past LAZY_MIN_BYTES
    inline = tmp_path / "inline.onnx"
    onnx.save(model, str(inline))
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    external = ext_dir / "chain.onnx"
    _save_external(onnx.load(str(inline)), external)
    assert external_tensors(onnx.load(str(external), load_external_data=False))
    return inline, external


@pytest.mark.parametrize("load_weights", [True, False])
def test_external_data_input_gives_the_inline_models_fp8_bytes(chain_paths, tmp_path, load_weights):
    inline, external = chain_paths
    _convert(inline, out=tmp_path / "a.onnx")
    _convert(external, load_weights=load_weights, out=tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_lazy_load_keeps_weights_on_disk(chain_paths):
    _, external = chain_paths
    lazy = load_model(external, load_weights=False)
    loaded = load_model(external)
    assert external_tensors(lazy) and not external_tensors(loaded)
    assert lazy.ByteSize() < loaded.ByteSize() / 4  # the float weights are not in memory


@pytest.mark.parametrize("load_weights", [True, False])
def test_external_data_output_checks_runs_and_matches_inline(chain_paths, tmp_path, load_weights):
    inline, external = chain_paths
    out_inline, out_ext = tmp_path / "fp8_inline.onnx", tmp_path / "fp8_ext.onnx"
    _convert(inline, out=out_inline, external_data="never")
    _convert(external, load_weights=load_weights, out=out_ext, external_data="always")
    data_files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("fp8_ext.onnx."))
    assert len(data_files) == 1 and data_files[0].endswith(".data")
    saved = onnx.load(str(out_ext), load_external_data=False)
    assert {e.value for t in external_tensors(saved) for e in t.external_data if e.key == "location"} == {data_files[0]}
    onnx.checker.check_model(str(out_ext), full_check=True)
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)}
    a = make_session(str(out_inline)).run(None, feeds)
    b = make_session(str(out_ext)).run(None, feeds)
    np.testing.assert_array_equal(a[0], b[0])
    assert out_ext.stat().st_size < out_inline.stat().st_size / 4


def test_external_output_is_deterministic_and_replaces_old_data(chain_paths, tmp_path):
    _, external = chain_paths
    out = tmp_path / "m.onnx"
    _convert(external, out=out, external_data="always")
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("m.onnx")}
    _convert(external, out=out, external_data="always")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("m.onnx")} == first
    _convert(external, out=out, external_data="never")  # now inline: the old data file goes
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m.onnx")) == ["m.onnx"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.onnx")]  # no temps


def test_auto_goes_external_past_the_inline_limit(monkeypatch):
    model = matmul_chain(size=64, depth=2)
    weights = modelio.model_tensor_bytes(model)
    assert not wants_external_data(model, "auto")
    assert wants_external_data(model, "always")
    monkeypatch.setattr(modelio, "INLINE_LIMIT_BYTES", weights - 1)
    assert wants_external_data(model, "auto")
    with pytest.raises(OutputError, match="2 GiB"):
        wants_external_data(model, "never")
    with pytest.raises(OutputError, match="external_data"):
        wants_external_data(model, "sometimes")


def test_conv_model_with_external_data_round_trips(tmp_path):
    path = tmp_path / "cnn.onnx"
    _save_external(cnn(opset=17), path)
    out = tmp_path / "cnn_fp8.onnx"
    _convert(path, load_weights=False, out=out, external_data="always")
    validate_fp8_model(str(out))


def _damage(external, how):
    data = external.parent / (external.name + ".data")
    if how == "missing":
        data.unlink()
    elif how == "truncated":
        data.write_bytes(data.read_bytes()[:100])
    elif how == "outside":
        model = onnx.load(str(external), load_external_data=False)
        for t in external_tensors(model):
            for e in t.external_data:
                if e.key == "location":
                    e.value = "../inline.onnx"
        onnx.save(model, str(external))


@pytest.mark.parametrize("how, message", [
    ("missing", "missing|does not exist|checker"),
    ("truncated", "truncated|shorter|checker"),
    ("outside", "outside|checker"),
])
@pytest.mark.parametrize("load_weights", [True, False])
def test_damaged_external_data_is_a_model_error(chain_paths, how, message, load_weights):
    _, external = chain_paths
    _damage(external, how)
    with pytest.raises(ModelError, match=message):
        load_model(external, load_weights=load_weights)


def test_weights_encoded_in_parallel_slices_equal_encode():
    """encode_weights splits big weights into slices on all cores: the bytes must not change."""
    from concurrent.futures import ThreadPoolExecutor

    from fp8core.formats import encode
    from fp8core.rewrite import ENCODE_CHUNK_ELEMENTS, _encode_in_chunks

    x = np.random.default_rng(0).standard_normal((3, ENCODE_CHUNK_ELEMENTS // 2 + 7), dtype=np.float32) * 50
    x[0, :4] = [np.nan, np.inf, -np.inf, 1e-30]
    with ThreadPoolExecutor(2) as pool:
        for fmt in ("F143", "F152", "E4M3FN", "E5M2"):
            got = _encode_in_chunks(x, QuantParams(fmt, -2), pool)
            assert got.shape == x.shape and np.array_equal(got, encode(x, fmt, -2))


def test_release_frees_the_models_weights_after_writing(chain_paths, tmp_path):
    inline, _ = chain_paths
    fp8 = _convert(inline)
    seen = []
    save_model_atomic(fp8, str(tmp_path / "r.onnx"), check=lambda p: seen.append(len(fp8.graph.initializer)),
                      release=True)
    assert seen == [0] and not fp8.graph.initializer
    validate_fp8_model(str(tmp_path / "r.onnx"))


def test_cli_streams_external_weights_and_fingerprints_the_data_file(tmp_path):
    """Fast mode on a model with external data: weights stay on disk, the sha256 tag covers them,
    and the FP8 model equals the one converted from the same model stored inline."""
    from mlflow.tracking import MlflowClient

    from flows.cli import main
    from fp8core.graph import files_sha256

    model = matmul_chain(size=128, depth=2)
    inline = tmp_path / "inline.onnx"
    onnx.save_model(model, inline)
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    external = ext_dir / "m.onnx"
    onnx.save_model(model, external, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outs = []
    for src, name in ((inline, "a"), (external, "b")):
        out = tmp_path / name / "fp8.onnx"
        out.parent.mkdir()
        assert main(["--input_model", str(src), "--output_model", str(out), "--fp8_params", "F143,F143,-3,-3",
                     "--mlflow_tracking_uri", uri, "--experiment_name", "ext"]) == 0
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ext").experiment_id], order_by=["start_time ASC"])
    assert runs[1].data.tags["input_model_sha256"] == files_sha256([external, ext_dir / "m.data"])
    assert runs[1].data.metrics["model_bytes_before"] == external.stat().st_size + (ext_dir / "m.data").stat().st_size


def _execution_order(model: onnx.ModelProto, tmp_path) -> list[str]:
    """Node names in the order onnxruntime (our session options) executes them, from its profile."""
    import json

    from fp8core.modelio import example_feeds
    from fp8core.runtime import session_options

    options = session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "ort_profile")
    session = make_session(model.SerializeToString(), options)
    session.run(None, example_feeds(model))
    events = json.loads(open(session.end_profiling()).read())
    ordered = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                     key=lambda e: e["ts"])
    return [e["name"][: -len("_kernel_time")] for e in ordered]


def test_each_weight_is_dequantized_just_before_its_op_not_all_up_front(tmp_path):
    # onnxruntime would otherwise dequantize every FP8 weight to float at the start of a run: one
    # float copy of the whole model (the validation run of a 1 GB model peaked at 1.2 GB, now 0.8).
    model = prepare_model(matmul_chain(size=64, depth=6), 21)
    plans = plan_fp8_ops(model, "fp8", [], P, P)
    fp8 = rewrite_to_fp8(model, plans, encode_weights(model, plans))
    inits = {t.name for t in fp8.graph.initializer}
    weight_dq = {n.output[0]: n.name for n in fp8.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    matmuls = [n for n in fp8.graph.node if n.op_type == "MatMul"]
    order = _execution_order(fp8, tmp_path)
    position = {name: i for i, name in enumerate(order)}
    assert all(n.name in position for n in matmuls)
    for previous, op in zip(matmuls, matmuls[1:]):
        assert position[weight_dq[op.input[1]]] > position[previous.name], order


def test_validation_feeds_from_the_session_equal_the_models_example_feeds():
    from fp8core.modelio import example_feeds, session_example_feeds

    with_int = cnn()
    with_int.graph.input.append(onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 5]))
    for model in (cnn(), with_int, matmul_chain(size=8, depth=1)):
        session = make_session(model.SerializeToString())
        from_session, from_model = session_example_feeds(session), example_feeds(model)
        assert from_session.keys() == from_model.keys()
        for name in from_model:
            assert from_session[name].dtype == from_model[name].dtype
            np.testing.assert_array_equal(from_session[name], from_model[name])


def test_big_weights_reach_onnxruntime_beside_the_proto_and_compute_the_same(monkeypatch):
    # Past 2 GiB a proto cannot be serialized at all: --quantize on a 2.2 GB model failed with
    # "EncodeError: Failed to serialize proto". Here the limits are lowered to hand over 256 KiB weights.
    import fp8core.runtime as runtime
    from fp8core.calibration import ArraySource
    from fp8core.capture import capture_stats

    model = matmul_chain(size=256, depth=3)
    before = model.SerializeToString()
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    plain = make_session(model, extra_outputs=["h0", "h1"]).run(None, {"x": x})
    plain_stats = capture_stats(model, ["x", "h0", "h1"], ArraySource(Path("x.npz"), {"x": x}), 4)
    monkeypatch.setattr(runtime, "HANDOVER_MIN_BYTES", 1024)
    monkeypatch.setattr(runtime, "HANDOVER_TOTAL_BYTES", 1024)
    session = make_session(model, extra_outputs=["h0", "h1"])
    assert len(session.fp8_handed_over) == 3
    for a, b in zip(session.run(None, {"x": x}), plain):
        np.testing.assert_array_equal(a, b)
    handed_stats = capture_stats(model, ["x", "h0", "h1"], ArraySource(Path("x.npz"), {"x": x}), 4)
    assert handed_stats == plain_stats
    assert model.SerializeToString() == before  # the caller's model is untouched


def test_model_sha256_is_content_sensitive_and_never_serializes_the_whole_model(monkeypatch):
    from fp8core import modelio as mio

    model = matmul_chain(size=256, depth=3)  # 256 KiB weights: "large" initializers
    digest = mio.model_sha256(model)
    assert digest == mio.model_sha256(matmul_chain(size=256, depth=3))
    assert digest != mio.model_sha256(matmul_chain(size=256, depth=3, seed=1))
    whole = len(model.SerializeToString())
    real_serialize = mio.serialize

    def small_only(m):
        data = real_serialize(m)
        assert len(data) < whole / 10, "the whole model was serialized (fails past 2 GiB)"
        return data

    monkeypatch.setattr(mio, "serialize", small_only)
    assert mio.model_sha256(model) == digest


def _two_matmuls(seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    h, T = onnx.helper, onnx.TensorProto
    inits = [onnx.numpy_helper.from_array((rng.standard_normal((256, 256)) / 16).astype(np.float32), f"w{i}")
             for i in range(2)]
    graph = h.make_graph([h.make_node("MatMul", ["x", "w0"], ["h"]), h.make_node("MatMul", ["h", "w1"], ["y"])], "mm",
                         [h.make_tensor_value_info("x", T.FLOAT, ["N", 256])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 256])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])


def _save_inline_and_external(tmp_path, seed: int = 0):
    """The same two-MatMul model saved inline and with its weights in an external data file."""
    inline, external = tmp_path / "inline.onnx", tmp_path / "ext" / "m.onnx"
    external.parent.mkdir(exist_ok=True)
    onnx.save_model(_two_matmuls(seed), inline)
    onnx.save_model(_two_matmuls(seed), external, save_as_external_data=True, location="m.data", size_threshold=0)
    return inline, external


def _spy_on_model_loads(monkeypatch, with_name: bool = False) -> list:
    """Record every load the pipeline makes (fp8core.pipeline: the input model, the written FP8
    model read back): whether it read the weights (and which file)."""
    import fp8core.pipeline as load_task

    loads = []
    real_load = load_task._load

    def spy(path, load_weights=True):
        loads.append((os.path.basename(path), load_weights) if with_name else load_weights)
        return real_load(path, load_weights)

    monkeypatch.setattr(load_task, "_load", spy)
    return loads


def _run_cli(src, out, *flags: str, uri: str) -> None:
    from flows.cli import main

    out.parent.mkdir()
    assert main(["--input_model", str(src), "--output_model", str(out), *flags, "--mlflow_tracking_uri", uri]) == 0


def _convert_inline_then_external(tmp_path, loads: list, *flags: str) -> tuple[list, list]:
    """fp8-convert with ``flags`` on both copies: the two outputs, and the loads of the external run."""
    inline, external = _save_inline_and_external(tmp_path)
    outs = [tmp_path / "a" / "fp8.onnx", tmp_path / "b" / "fp8.onnx"]
    for src, out in zip((inline, external), outs):
        loads.clear()
        _run_cli(src, out, *flags, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return outs, list(loads)


def test_quantize_streams_external_weights_and_its_cache_key_covers_them(tmp_path, monkeypatch):
    """--quantize (and per-channel scales) on a model with external data: weights never loaded by
    Python, the same FP8 model as from the inline copy, and new weights in the data file are a
    statistics-cache miss, not a stale hit."""
    from mlflow.tracking import MlflowClient

    loads = _spy_on_model_loads(monkeypatch)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(9).standard_normal((16, 256)).astype(np.float32))
    flags = ["--quantize", "--quantize_loss_type", "mse", "--data_preprocess", str(calib), "--weight_granularity",
             "per_channel", "--weight_rounding", "nearest", "--cache_dir", str(tmp_path / "cache"), "--experiment_name", "q"]
    (a, b), loaded = _convert_inline_then_external(tmp_path, loads, *flags)
    assert loaded == [False], "the external weights were loaded into memory"
    assert a.read_bytes() == b.read_bytes()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    external = tmp_path / "ext" / "m.onnx"
    c, d = tmp_path / "c" / "fp8.onnx", tmp_path / "d" / "fp8.onnx"
    _run_cli(external, c, *flags, uri=uri)  # unchanged: a cache hit
    onnx.save_model(_two_matmuls(1), external, save_as_external_data=True, location="m.data", size_threshold=0)
    _run_cli(external, d, *flags, uri=uri)  # same graph, new weights in the data file
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("q").experiment_id], order_by=["start_time ASC"])
    assert [r.data.tags["calibration_cache"] for r in runs] == ["miss", "miss", "hit", "miss"]
    assert c.read_bytes() == b.read_bytes() != d.read_bytes()


def test_default_weight_rounding_fits_inline_weights_and_streams_external_ones(tmp_path, monkeypatch, capsys):
    """--weight_rounding auto (the default) with --quantize: gptaq where the weights are in memory;
    a model streamed from external data keeps streaming, rounds to nearest and says so."""
    from mlflow.tracking import MlflowClient

    loads = _spy_on_model_loads(monkeypatch)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(9).standard_normal((16, 256)).astype(np.float32))
    (a, b), loaded = _convert_inline_then_external(
        tmp_path, loads, "--quantize", "--data_preprocess", str(calib), "--experiment_name", "auto")
    assert loaded == [False], "the external weights were loaded into memory"
    assert "weights rounded to nearest: the model's weights are streamed" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("auto").experiment_id], order_by=["start_time ASC"])
    assert [r.data.params["weight_rounding"] for r in runs] == ["auto", "auto"]
    assert [r.data.tags.get("weight_rounding_used") for r in runs] == ["gptaq", None]
    assert a.read_bytes() != b.read_bytes()  # GPTQ'd weights, not the nearest ones


def test_evaluation_and_comparison_stream_external_weights_and_match_inline(tmp_path, monkeypatch):
    """--eval_data and --precision_compare on a model with external data: onnxruntime reads the
    float weights from the data file (never loaded by Python); same numbers as the inline copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    loads = _spy_on_model_loads(monkeypatch, with_name=True)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((24, 256)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:16])
    pq.write_table(pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(x),
                             "label": pa.array(rng.integers(0, 256, 24))}), tmp_path / "eval.parquet")
    outs, loaded = _convert_inline_then_external(
        tmp_path, loads, "--fp8_params", "F143,F143,-4,-6", "--eval_data", str(tmp_path / "eval.parquet"),
        "--precision_compare", "--compare_data", str(tmp_path / "calib.npz"))
    assert loaded == [("m.onnx", False), ("fp8.onnx", True)], loaded  # float weights stay on disk
    a, b = ((out.parent / "precision_compare.json").read_text() + repr(out.read_bytes()) for out in outs)
    assert a == b


def test_fallback_streams_external_weights_and_matches_inline(tmp_path, monkeypatch):
    """--num_of_layers_keep_fp16 and --accuracy_target on a model with external data: trials read
    the float weights (of the original and of kept ops) from the data file; same result as inline."""
    loads = _spy_on_model_loads(monkeypatch)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(5).standard_normal((16, 256)).astype(np.float32))
    outs, loaded = _convert_inline_then_external(
        tmp_path, loads, "--fp8_params", "F152,F152,-4,-6", "--compare_data", str(tmp_path / "calib.npz"),
        "--num_of_layers_keep_fp16", "1", "--accuracy_target", "snr_db=200", "--accuracy_target_samples", "8")
    assert loaded == [False]
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_the_model_file_is_written_in_pieces_with_serializes_bytes(tmp_path):
    """save writes the graph's initializers one at a time (modelio.serialized_pieces): joined, the
    pieces are SerializeToString(deterministic=True) byte for byte, whatever fields the model
    and its graph carry around the initializers."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((300, 300)).astype(np.float32), f"w{i}") for i in range(3)]
    weights.append(numpy_helper.from_array(np.arange(5, dtype=np.int64), "shape_like"))
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0", doc_string="first"),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="mm1"),
             helper.make_node("MatMul", ["h1", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 300])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 300])], weights,
                              doc_string="graph doc", value_info=[helper.make_tensor_value_info("h0", TensorProto.FLOAT, None)])
    graph.sparse_initializer.add().values.CopyFrom(numpy_helper.from_array(np.ones(2, np.float32), "sp"))
    graph.metadata_props.add(key="k", value="v")
    fn = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              producer_name="test", doc_string="model doc", functions=[fn])
    model.metadata_props.add(key="author", value="x")
    model.model_version = 3
    for m in (model, cnn(), helper.make_model(helper.make_graph([], "empty", [], [])), onnx.ModelProto(ir_version=8)):
        assert b"".join(modelio.serialized_pieces(m)) == m.SerializeToString(deterministic=True)
    path = tmp_path / "m.onnx"
    size = save_model_atomic(model, str(path), external_data="never")
    assert path.read_bytes() == model.SerializeToString(deterministic=True) and size == path.stat().st_size
