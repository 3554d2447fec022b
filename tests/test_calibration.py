"""Calibration data ingestion: formats round-trip, batching, safe pickle, validation, CLI."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper

from fp8core.calibration import (
    CalibrationDataError,
    model_input_specs,
    open_dataset,
    validate_against_model,
    write_parquet,
)
from fp8core.calibration_cli import main

RNG = np.random.default_rng(0)


def sample_arrays(n: int = 10) -> dict[str, np.ndarray]:
    """Inputs of several dtypes and ranks, as a model's calibration set would hold."""
    return {
        "image": RNG.standard_normal((n, 3, 4, 5)).astype(np.float32),
        "half": RNG.standard_normal((n, 6)).astype(np.float16),
        "ids": RNG.integers(0, 1000, (n, 7)).astype(np.int64),
        "pixels": RNG.integers(0, 256, (n, 2, 2)).astype(np.uint8),
        "mask": RNG.integers(0, 2, (n, 2, 3)).astype(bool),
        "label": np.arange(n, dtype=np.int32),
    }


def read_all(source, names=None, batch_size=4) -> dict[str, np.ndarray]:
    batches = list(source.iter_batches(batch_size, names))
    keys = batches[0].keys()
    return {key: np.concatenate([batch[key] for batch in batches]) for key in keys}


def assert_same_arrays(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# --------------------------------------------------------------------------------------------
# Formats round-trip
# --------------------------------------------------------------------------------------------
def test_write_parquet_round_trips_as_fixed_shape_tensor_columns(tmp_path):
    arrays = sample_arrays()
    path = write_parquet(arrays, tmp_path / "cal.parquet", row_group_size=3)

    schema = pq.read_schema(path)
    for name in ("image", "half", "ids", "pixels"):
        assert isinstance(schema.field(name).type, pa.FixedShapeTensorType), name
    # Independent reader: pyarrow's own tensor conversion gives back the arrays.
    table = pq.read_table(path)
    np.testing.assert_array_equal(table.column("image").combine_chunks().to_numpy_ndarray(),
                                  arrays["image"])  # fmt: skip
    assert pq.ParquetFile(path).metadata.num_row_groups == 4  # 10 rows, 3 per group

    source = open_dataset(path)
    assert source.columns == list(arrays)
    assert source.num_samples == 10
    for name, array in arrays.items():
        assert source.sample_shape(name) == array.shape[1:]
        assert source.dtype(name) == array.dtype
    assert_same_arrays(read_all(source), arrays)


def test_parquet_list_columns_with_shape_metadata(tmp_path):
    image = RNG.standard_normal((5, 2, 3, 4)).astype(np.float32)
    tokens = RNG.integers(0, 9, (5, 2, 6)).astype(np.int32)
    table = pa.table({
        # One list level per dimension.
        "image": pa.array(image.tolist(), pa.list_(pa.list_(pa.list_(pa.float32())))),
        # A single flat list level holding the whole sample row-major.
        "tokens": pa.array(tokens.reshape(5, -1).tolist(), pa.list_(pa.int32())),
        # Fixed-size lists carry the shape in the type, no metadata needed.
        "fixed": pa.array(tokens.tolist(), pa.list_(pa.list_(pa.int32(), 6), 2)),
        "label": pa.array([f"class {i}" for i in range(5)]),
    })
    table = table.replace_schema_metadata({
        b"fp8.shape.image": json.dumps([2, 3, 4]).encode(),
        b"fp8.shape.tokens": b"[2, 6]",
    })
    pq.write_table(table, tmp_path / "lists.parquet", row_group_size=2)

    source = open_dataset(tmp_path / "lists.parquet")
    assert source.columns == ["image", "tokens", "fixed", "label"]
    assert source.sample_shape("image") == (2, 3, 4)
    assert source.sample_shape("tokens") == (2, 6)
    assert source.sample_shape("fixed") == (2, 6)
    got = read_all(source, names=["image", "tokens", "fixed"], batch_size=3)
    assert_same_arrays(got, {"image": image, "tokens": tokens, "fixed": tokens})
    # The string label is listed but is no tensor: asked for, it is refused by name.
    with pytest.raises(CalibrationDataError, match="column 'label' holds string values"):
        source.iter_batches(2)


def test_permuted_fixed_shape_tensor_reads_as_pyarrow_defines_it(tmp_path):
    tensor_type = pa.fixed_shape_tensor(pa.float32(), (2, 3), permutation=[1, 0])
    storage = pa.array(np.arange(24, dtype=np.float32).reshape(4, 6).tolist(),
                       pa.list_(pa.float32(), 6))  # fmt: skip
    column = pa.ExtensionArray.from_storage(tensor_type, storage)
    pq.write_table(pa.table({"x": column}), tmp_path / "perm.parquet")

    source = open_dataset(tmp_path / "perm.parquet")
    assert source.sample_shape("x") == (3, 2)
    np.testing.assert_array_equal(read_all(source)["x"], column.to_numpy_ndarray())


def test_directory_of_parquet_files_is_one_data_set_in_name_order(tmp_path):
    arrays = sample_arrays(12)
    bounds = [(0, 5), (5, 8), (8, 12)]
    # Written out of order: the name, not the creation time, decides the order.
    for part, (start, stop) in reversed(list(enumerate(bounds))):
        chunk = {name: array[start:stop] for name, array in arrays.items()}
        write_parquet(chunk, tmp_path / f"part-{part:03d}.parquet", row_group_size=2)
    (tmp_path / "_SUCCESS").write_text("")

    source = open_dataset(tmp_path)
    assert source.num_samples == 12
    sizes = [len(batch["image"]) for batch in source.iter_batches(5)]
    assert sizes == [5, 5, 2]  # batches cross file and row-group boundaries
    assert_same_arrays(read_all(source, batch_size=5), arrays)


def test_directory_files_must_agree(tmp_path):
    write_parquet({"x": np.zeros((2, 3), np.float32)}, tmp_path / "a.parquet")
    write_parquet({"x": np.zeros((2, 4), np.float32)}, tmp_path / "b.parquet")
    with pytest.raises(CalibrationDataError, match=r"b\.parquet does not match .*a\.parquet.*'x'"):
        open_dataset(tmp_path)


def test_npz_round_trip(tmp_path):
    arrays = sample_arrays()
    np.savez(tmp_path / "cal.npz", **arrays)
    source = open_dataset(tmp_path / "cal.npz")
    assert source.num_samples == 10
    assert_same_arrays(read_all(source, batch_size=3), arrays)


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_poprt_pickle_round_trip(tmp_path, protocol):
    arrays = sample_arrays()
    path = tmp_path / "cal.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol=protocol))
    assert_same_arrays(read_all(open_dataset(path)), arrays)


def test_pickle_ordered_dict_is_read_as_dict(tmp_path):
    arrays = sample_arrays(3)
    path = tmp_path / "cal.pkl"
    path.write_bytes(pickle.dumps(collections.OrderedDict(arrays)))
    assert_same_arrays(read_all(open_dataset(path)), arrays)


def test_pickle_value_may_be_a_list_of_samples(tmp_path):
    samples = [RNG.standard_normal((3, 2)).astype(np.float32) for _ in range(4)]
    path = tmp_path / "cal.pickle"
    path.write_bytes(pickle.dumps({"x": samples}))
    np.testing.assert_array_equal(read_all(open_dataset(path))["x"], np.stack(samples))


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "batch_size", "row_group"), [(10, 3, 4), (10, 10, 3), (7, 20, 2),
                                                             (9, 1, 5), (8, 4, 4)])  # fmt: skip
def test_batches_have_the_asked_size_and_concatenate_to_the_data(tmp_path, n, batch_size,
                                                                 row_group):
    arrays = sample_arrays(n)
    write_parquet(arrays, tmp_path / "cal.parquet", row_group_size=row_group)
    np.savez(tmp_path / "cal.npz", **arrays)
    expected_sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    for path in (tmp_path / "cal.parquet", tmp_path / "cal.npz"):
        batches = list(open_dataset(path).iter_batches(batch_size, names=["image", "ids"]))
        assert [len(b["image"]) for b in batches] == expected_sizes
        assert all(list(b) == ["image", "ids"] for b in batches)
        got = {k: np.concatenate([b[k] for b in batches]) for k in ("image", "ids")}
        assert_same_arrays(got, {"image": arrays["image"], "ids": arrays["ids"]})


def test_parquet_is_read_a_row_group_at_a_time(tmp_path):
    # 16 MiB of samples in row groups of 4 samples (1 MiB): Arrow's allocations while iterating
    # must stay near one row group, far from the whole file.
    samples = np.ones((64, 256, 256), np.float32) * np.arange(64, dtype=np.float32)[:, None, None]
    write_parquet({"x": samples}, tmp_path / "big.parquet", row_group_size=4)
    del samples
    baseline = pa.total_allocated_bytes()
    peak, checksum = 0, 0.0
    for batch in open_dataset(tmp_path / "big.parquet").iter_batches(4):
        peak = max(peak, pa.total_allocated_bytes() - baseline)
        checksum += float(batch["x"][:, 0, 0].sum())
    assert checksum == sum(range(64))
    assert peak < 4 * 2**20, peak


def test_batch_size_must_be_positive(tmp_path):
    write_parquet({"x": np.zeros((2, 3), np.float32)}, tmp_path / "a.parquet")
    with pytest.raises(CalibrationDataError, match="batch size 0"):
        open_dataset(tmp_path / "a.parquet").iter_batches(0)


def test_unknown_column_names_the_columns(tmp_path):
    write_parquet({"x": np.zeros((2, 3), np.float32)}, tmp_path / "a.parquet")
    with pytest.raises(CalibrationDataError, match="no column 'y'; its columns are 'x'"):
        open_dataset(tmp_path / "a.parquet").iter_batches(2, names=["y"])


# --------------------------------------------------------------------------------------------
# Pickle safety
# --------------------------------------------------------------------------------------------
class _RunsACommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    witness = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    payload = {"x": np.zeros((2, 3), np.float32), "y": _RunsACommand(f"touch {witness}")}
    path.write_bytes(pickle.dumps(payload))
    # Proof the payload is live: the plain unpickler runs the command.
    pickle.loads(path.read_bytes())
    assert witness.exists()
    witness.unlink()

    with pytest.raises(CalibrationDataError, match=rf"refers to {os.system.__module__}\.system"):
        open_dataset(path)
    assert not witness.exists()


@pytest.mark.parametrize(("payload", "refused"), [
    (pickle.dumps({"x": eval}), "builtins.eval"),
    # Protocol 2 rebuilds bytes with _codecs.encode(text, "latin1"); any other codec is refused.
    (pickle.dumps({"x": np.zeros(2)}, protocol=2).replace(b"latin1", b"rot_13"),
     "_codecs.encode with encoding 'rot_13'"),
], ids=["builtins-eval", "rot13-codec"])  # fmt: skip
def test_pickle_refuses_other_callables(tmp_path, payload, refused):
    path = tmp_path / "p.pkl"
    path.write_bytes(payload)
    with pytest.raises(CalibrationDataError, match=f"refers to {refused},"):
        open_dataset(path)


@pytest.mark.parametrize(("payload", "message"), [
    ([np.zeros((2, 3))], "holds a list, not a dict"),
    ({"x": np.array([1, "a"], dtype=object)}, "'x' is an object array"),
    ({"x": [1.0, 2.0]}, "'x' is a list, not a numpy array"),
    ({3: np.zeros(2)}, "key 3 that is not a string"),
    ({"x": np.zeros(3), "y": np.zeros(4)}, r"different sample counts \('x': 3, 'y': 4\)"),
])  # fmt: skip
def test_pickle_shapes_other_than_dict_of_arrays_are_refused(tmp_path, payload, message):
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CalibrationDataError, match=message):
        open_dataset(path)


# --------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------
def _valid_files(tmp_path: Path) -> dict[str, Path]:
    arrays = {"x": RNG.standard_normal((20, 8)).astype(np.float32)}
    np.savez(tmp_path / "ok.npz", **arrays)
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps(arrays))
    return {
        "parquet": write_parquet(arrays, tmp_path / "ok.parquet"),
        "npz": tmp_path / "ok.npz",
        "pkl": tmp_path / "ok.pkl",
    }


@pytest.mark.parametrize("kind", ["parquet", "npz", "pkl"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_files_raise_calibration_data_error(tmp_path, kind, damage):
    good = _valid_files(tmp_path)[kind]
    content = good.read_bytes()
    bad = tmp_path / f"bad{good.suffix}"
    bad.write_bytes({"truncated": content[: len(content) // 2],
                     "garbage": bytes(RNG.integers(0, 256, 300, dtype=np.uint8)),
                     "empty": b""}[damage])  # fmt: skip
    with pytest.raises(CalibrationDataError, match=r"bad\.\w+.*(damaged|not a \.npz)"):
        read_all(open_dataset(bad))


@pytest.mark.parametrize("kind", ["parquet", "npz"])  # pickle has no checksum to catch this
def test_one_flipped_data_byte_is_detected(tmp_path, kind):
    good = _valid_files(tmp_path)[kind]
    content = bytearray(good.read_bytes())
    value = open_dataset(good).iter_batches(20).__next__()["x"][7, 3].tobytes()
    offset = content.find(value)  # the value is stored verbatim (plain/dictionary page, .npy)
    assert offset > 0
    content[offset + 1] ^= 0x40
    bad = tmp_path / f"bad{good.suffix}"
    bad.write_bytes(bytes(content))
    with pytest.raises(CalibrationDataError, match=r"bad\.\w+.*damaged"):
        read_all(open_dataset(bad))


def test_npz_object_array_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(CalibrationDataError, match="object array"):
        open_dataset(tmp_path / "obj.npz")


def test_missing_path_unknown_suffix_and_empty_directory(tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        open_dataset(tmp_path / "nope.parquet")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(CalibrationDataError, match=r"unknown type '\.csv'; use one of"):
        open_dataset(tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="holds no .parquet files"):
        open_dataset(tmp_path / "empty")


def test_ragged_and_null_list_cells_name_the_sample(tmp_path):
    ragged = pa.table({"x": pa.array([[1.0, 2.0], [1.0, 2.0], [1.0]], pa.list_(pa.float32()))})
    pq.write_table(ragged.replace_schema_metadata({b"fp8.shape.x": b"[2]"}), tmp_path / "r.parquet")
    with pytest.raises(CalibrationDataError, match="'x' sample 2 .* has 1 values"):
        read_all(open_dataset(tmp_path / "r.parquet"))

    nulls = pa.table({"x": pa.array([[1.0, 2.0], [1.0, None]], pa.list_(pa.float32()))})
    pq.write_table(nulls.replace_schema_metadata({b"fp8.shape.x": b"[2]"}), tmp_path / "n.parquet")
    with pytest.raises(CalibrationDataError, match="'x' sample 1 .* missing"):
        read_all(open_dataset(tmp_path / "n.parquet"))


def test_list_column_without_shape_metadata_is_listed_but_unreadable(tmp_path):
    table = pa.table({"x": pa.array([[1.0, 2.0]], pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "l.parquet")
    source = open_dataset(tmp_path / "l.parquet")
    assert source.columns == ["x"]
    with pytest.raises(CalibrationDataError, match="without its sample shape .*fp8.shape.x"):
        source.sample_shape("x")


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------
def test_fingerprint_is_sha256_of_length_and_bytes_in_read_order(tmp_path):
    files = []
    for part in range(2):
        files.append(write_parquet({"x": np.full((3, 2), part, np.float32)},
                                   tmp_path / "set" / f"{part}.parquet"))  # fmt: skip
    expected = hashlib.sha256()
    for file in files:
        expected.update(file.stat().st_size.to_bytes(8, "little") + file.read_bytes())
    assert open_dataset(tmp_path / "set").fingerprint() == expected.hexdigest()

    copy = tmp_path / "copy.parquet"
    copy.write_bytes(files[0].read_bytes())
    assert open_dataset(copy).fingerprint() == open_dataset(files[0]).fingerprint()
    assert open_dataset(files[1]).fingerprint() != open_dataset(files[0]).fingerprint()


# --------------------------------------------------------------------------------------------
# Validation against the model
# --------------------------------------------------------------------------------------------
MODEL_INPUTS = {"image": (np.float32, ("N", 3, 4, 5)), "ids": (np.int64, (None, 7))}


def _parquet_source(tmp_path, arrays):
    return open_dataset(write_parquet(arrays, tmp_path / "cal.parquet", row_group_size=4))


def test_valid_data_passes_and_is_summarised(tmp_path):
    arrays = sample_arrays(20)
    arrays["image"] = arrays["image"].astype(np.float64)  # float64 -> float32 is same_kind
    summary = validate_against_model(_parquet_source(tmp_path, arrays), MODEL_INPUTS, batch_size=8)
    assert summary.num_samples == 20
    assert summary.inputs["image"].sample_shape == (3, 4, 5)
    assert summary.inputs["image"].data_dtype == np.float64
    assert summary.inputs["image"].model_dtype == np.float32
    assert set(summary.inputs) == {"image", "ids"}


def test_missing_input_lists_missing_and_present_columns(tmp_path):
    source = _parquet_source(tmp_path, {"image": sample_arrays()["image"]})
    expected = r"lacks model input\(s\) 'ids'; its columns are 'image'"
    with pytest.raises(CalibrationDataError, match=expected):
        validate_against_model(source, MODEL_INPUTS, 4)


def test_wrong_sample_shape(tmp_path):
    arrays = sample_arrays()
    arrays["image"] = np.zeros((10, 3, 4, 6), np.float32)
    with pytest.raises(CalibrationDataError, match=r"'image' samples have shape \(3, 4, 6\) "
                                                   r"but the model takes \(3, 4, 5\)"):  # fmt: skip
        validate_against_model(_parquet_source(tmp_path, arrays), MODEL_INPUTS, 4)


def test_wrong_rank(tmp_path):
    arrays = sample_arrays()
    arrays["ids"] = np.zeros((10, 1, 7), np.int64)
    with pytest.raises(CalibrationDataError, match=r"'ids' samples have shape \(1, 7\)"):
        validate_against_model(_parquet_source(tmp_path, arrays), MODEL_INPUTS, 4)


def test_uncastable_dtype(tmp_path):
    arrays = sample_arrays()
    arrays["ids"] = arrays["ids"].astype(np.float32)
    with pytest.raises(CalibrationDataError, match="'ids' is float32 but the model takes int64"):
        validate_against_model(_parquet_source(tmp_path, arrays), MODEL_INPUTS, 4)


@pytest.mark.parametrize(("bad_value", "problem"), [(np.nan, "NaN"), (np.inf, "Inf"),
                                                    (-np.inf, "Inf")])  # fmt: skip
def test_non_finite_value_names_input_and_sample(tmp_path, bad_value, problem):
    arrays = sample_arrays(20)
    arrays["image"][17, 2, 1, 3] = bad_value  # in the third batch of 8
    expected = f"calibration input 'image' sample 17 contains {problem}"
    with pytest.raises(CalibrationDataError, match=expected):
        validate_against_model(_parquet_source(tmp_path, arrays), MODEL_INPUTS, 8)


def test_value_beyond_the_model_dtype_range(tmp_path):
    arrays = {"x": np.ones((6, 2), np.float32)}
    arrays["x"][4, 1] = 70000.0  # finite in float32, inf in float16
    with pytest.raises(CalibrationDataError, match="'x' sample 4 has values beyond the float16"):
        validate_against_model(_parquet_source(tmp_path, arrays), {"x": (np.float16, None)}, 4)


def test_integer_value_beyond_the_model_dtype_range(tmp_path):
    arrays = {"ids": np.zeros((5, 3), np.int64)}
    arrays["ids"][3, 0] = 2**40
    with pytest.raises(CalibrationDataError, match="'ids' sample 3 has values beyond the int32"):
        validate_against_model(_parquet_source(tmp_path, arrays), {"ids": (np.int32, None)}, 2)


def test_bool_and_integer_data_feed_a_float_model(tmp_path):
    arrays = {"mask": np.ones((4, 2), bool), "pixels": np.full((4, 2), 255, np.uint8)}
    spec = {"mask": (np.float16, (None, 2)), "pixels": (np.float32, (None, 2))}
    summary = validate_against_model(_parquet_source(tmp_path, arrays), spec, 3)
    assert summary.inputs["mask"].data_dtype == np.bool_


def test_empty_data_set(tmp_path):
    source = _parquet_source(tmp_path, {"image": np.zeros((0, 3, 4, 5), np.float32)})
    assert source.num_samples == 0
    with pytest.raises(CalibrationDataError, match="holds no samples"):
        validate_against_model(source, MODEL_INPUTS, 4)


def test_fixed_model_batch_dimension(tmp_path):
    source = _parquet_source(tmp_path, {"x": np.zeros((6, 2), np.float32)})
    with pytest.raises(CalibrationDataError, match="fixed batch size of 1 .* use batch size 1"):
        validate_against_model(source, {"x": (np.float32, (1, 2))}, 4)
    with pytest.raises(CalibrationDataError, match="6 samples, not a multiple .* batch size 4"):
        validate_against_model(source, {"x": (np.float32, (4, 2))}, 4)
    assert validate_against_model(source, {"x": (np.float32, (2, 2))}, 2).num_samples == 6


def test_model_input_specs_reads_non_initializer_inputs():
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.zeros(16, np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 3, None]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4]),  # old exporters do this
            helper.make_tensor_value_info("ids", TensorProto.INT64, None),
        ],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
        initializer=[weight],
    )
    specs = model_input_specs(helper.make_model(graph))
    assert specs == {"x": (np.dtype(np.float16), (None, 3, None), 0),
                     "ids": (np.dtype(np.int64), None, 0)}  # fmt: skip


def test_inputs_without_batch_axis_or_batched_on_another_axis(tmp_path):
    """A recurrent state ``[2, batch, 8]`` is stored per sample as ``[2, 8]``; a scalar sample
    rate, which has no batch axis, per sample as a scalar."""
    source = _parquet_source(tmp_path, {"state": np.zeros((6, 2, 8), np.float32), "sr": np.full(6, 16000, np.int64)})
    spec = {"state": (np.float32, (2, None, 8), 1), "sr": (np.int64, (), None)}
    assert validate_against_model(source, spec, 3).num_samples == 6
    with pytest.raises(CalibrationDataError, match=r"takes \(2, 9\) per sample \(batch axis 1"):
        validate_against_model(source, {"state": (np.float32, (2, None, 9), 1)}, 3)


def test_model_input_specs_feed_validation(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3])],
    )
    model = helper.make_model(graph)
    onnx.checker.check_model(model)
    source = _parquet_source(tmp_path, {"x": np.ones((5, 2, 3), np.float64)})
    summary = validate_against_model(source, model_input_specs(model), batch_size=2)
    assert summary.inputs["x"].sample_shape == (2, 3)
    assert summary.inputs["x"].model_dtype == np.float32


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def test_cli_to_parquet_then_info(tmp_path, capsys):
    arrays = sample_arrays(6)
    (tmp_path / "cal.pkl").write_bytes(pickle.dumps(arrays))
    assert main(["to-parquet", str(tmp_path / "cal.pkl"), str(tmp_path / "cal.parquet")]) == 0
    assert_same_arrays(read_all(open_dataset(tmp_path / "cal.parquet")), arrays)

    capsys.readouterr()
    assert main(["info", str(tmp_path / "cal.parquet")]) == 0
    out = capsys.readouterr().out
    assert "samples: 6" in out
    assert open_dataset(tmp_path / "cal.parquet").fingerprint() in out
    assert any(line.split() == ["image", "float32", "(3,", "4,", "5)"] for line in out.splitlines())
    assert any(line.split() == ["label", "int32", "()"] for line in out.splitlines())


def test_cli_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"x": _RunsACommand("true")}))
    assert main(["to-parquet", str(evil), str(tmp_path / "out.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8-data: error: calibration pickle") and err.count("\n") == 1
    assert not (tmp_path / "out.parquet").exists()


def test_cli_as_module_subprocess(tmp_path):
    np.savez(tmp_path / "cal.npz", x=np.ones((4, 2), np.float32))
    run = [sys.executable, "-m", "fp8core.calibration_cli"]
    convert = ["to-parquet", str(tmp_path / "cal.npz"), str(tmp_path / "c.parquet")]
    done = subprocess.run([*run, *convert], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*run, "info", str(tmp_path / "c.parquet")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and "samples: 4" in done.stdout
    done = subprocess.run([*run, "info", str(tmp_path / "missing.npz")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_generated_validation_inputs_mask_half_and_keep_flags_off():
    """probe_feeds (fast mode's validation inputs): a bool mask is half True, so the FP8 model
    is not checked on the zeros an all-False mask would leave; a scalar bool flag stays False."""
    from fp8core.inputs import input_specs, probe_feeds

    graph = helper.make_graph(
        [helper.make_node("Where", ["mask", "x", "x"], ["y0"]), helper.make_node("Identity", ["flag"], ["f"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64]),
              helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 64]),
              helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y0", TensorProto.FLOAT, ["N", 64]),
         helper.make_tensor_value_info("f", TensorProto.BOOL, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    feeds = probe_feeds(input_specs(model), 16)
    assert feeds["mask"].dtype == np.bool_ and feeds["mask"].shape == (1, 64)
    assert 0.25 < feeds["mask"].mean() < 0.75
    assert feeds["flag"].shape == () and not feeds["flag"]
    assert np.array_equal(feeds["mask"], probe_feeds(input_specs(model), 16)["mask"])  # seeded
