"""Calibration data ingestion (SPEC section 5): open a data set, read it in batches, check it fits.

A calibration data set is a table: one column per model input, one row per sample, each cell one
sample's tensor, already preprocessed (what is stored is what the model receives). Formats:

* **Parquet** (native), a file or a directory of ``*.parquet`` files read in name order as one data
  set (their columns must agree). A column holds one of:

  - an Arrow ``fixed_shape_tensor`` extension column (what :func:`write_parquet` writes);
  - nested ``fixed_size_list`` columns (the shape is in the type);
  - (nested) variable ``list`` columns with the per-sample shape in the schema metadata under
    ``b"fp8.shape.<column>"`` as a JSON list, e.g. ``b"[3, 224, 224]"``. With fewer list levels
    than dimensions, the innermost level holds the remaining dimensions flattened (row-major);
  - a plain numeric column: one scalar per sample (sample shape ``()``).

  Columns of other kinds (strings, structs, lists without a recorded shape) may exist, e.g. a
  label; they are listed, and refused only when a caller asks to read them.
  Parquet is read row group by row group (``ParquetFile.iter_batches``), never whole.
* **.npz**: ``{name: ndarray[N, ...]}``, loaded with ``allow_pickle=False``.
* **.pkl / .pickle**: PopRT's ``{input_name: ndarray[N, ...]}`` (a value may also be a list of
  per-sample arrays of one shape, which are stacked). Pickle runs code on load, so it is read only
  through :class:`_ArrayOnlyUnpickler`, which resolves nothing but the few numpy globals a plain
  array needs; any other global is refused before anything runs.

Every user-facing problem raises :class:`CalibrationDataError` with a one-line message naming the
file, input or sample and how to fix it.

Modules: ``source`` (columns, sources, batching, an evenly spaced subset, the error), ``parquet`` (read and write),
``npz``, ``safe_pickle``, ``opening`` (:func:`open_dataset`), ``checks`` (data against the model).
"""

from __future__ import annotations

from fp8core.calibration.source import (
    ArraySource, CalibrationDataError, CalibrationSource, ColumnInfo, EvenlySpaced, NPZ_SUFFIXES,
    PARQUET_SUFFIXES, PICKLE_SUFFIXES, SHAPE_METADATA_PREFIX, available_memory_bytes, evenly_spaced,
)
from fp8core.calibration.parquet import ParquetSource, write_parquet
from fp8core.calibration.opening import open_dataset
from fp8core.calibration.checks import (
    Dim, InputSummary, ModelInputSpec, ValidationSummary, check_fits, model_input_specs,
    validate_against_model,
)

__all__ = ['ArraySource', 'CalibrationDataError', 'CalibrationSource', 'ColumnInfo', 'Dim', 'EvenlySpaced', 'evenly_spaced', 'InputSummary', 'ModelInputSpec', 'NPZ_SUFFIXES', 'PARQUET_SUFFIXES', 'PICKLE_SUFFIXES', 'ParquetSource', 'SHAPE_METADATA_PREFIX', 'ValidationSummary', 'available_memory_bytes', 'check_fits', 'model_input_specs', 'open_dataset', 'validate_against_model', 'write_parquet']
