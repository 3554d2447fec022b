"""Top-1 accuracy of a float and an FP8 model on labelled data (the demo's `label` column), both
models run on the same batches of one stream (:func:`fp8core.stream.stream`)."""

from __future__ import annotations

import os

import numpy as np
import onnx

from fp8core.calibration import open_dataset
from fp8core.errors import FP8Error
from fp8core.model import Model
from fp8core.stream import Tap, stream


class EvaluationDataError(FP8Error):
    """--eval_data cannot score the models (no labels)."""


def open_evaluation_data(data_path: str, label_column: str = "label"):
    """The evaluation data, checked to hold the labels: run before any conversion work, so a
    wrong file fails in one line at the start and not after the conversion."""
    if not os.path.exists(data_path):
        raise EvaluationDataError(f"evaluation data {data_path} does not exist; check the --eval_data path")
    source = open_dataset(data_path)
    if label_column not in source.columns:
        columns = ", ".join(repr(c) for c in source.columns) or "(none)"
        raise EvaluationDataError(
            f"evaluation data {data_path} has no {label_column!r} column (its columns: {columns}); add "
            f"each sample's integer class as a column named {label_column!r}, or leave out --eval_data")
    return source


def evaluate_top1(
    float_model: Model | onnx.ModelProto,
    fp8_model: Model | onnx.ModelProto,
    data_path: str,
    label_column: str = "label",
    batch_size: int = 64,
) -> dict:
    """Accuracy of both models (argmax of the first output) and how often they agree."""
    source = open_evaluation_data(data_path, label_column)
    original = Tap(float_model, [Model.of(float_model).graph.output[0].name], label="the original model",
                   what="evaluation")
    fp8 = Tap(fp8_model, [Model.of(fp8_model).graph.output[0].name], label="the FP8 model", what="evaluation")
    correct = np.zeros(2, dtype=np.int64)
    agree = total = 0
    for batch in stream(original, source, batch_size=batch_size, paired=fp8, columns=[label_column], what="evaluation"):
        labels = batch.columns[label_column].reshape(-1)
        preds = [next(iter(out.values())).argmax(axis=-1).reshape(-1) for out in (batch.values, batch.paired)]
        correct += [(p == labels).sum() for p in preds]
        agree += int((preds[0] == preds[1]).sum())
        total += labels.size
    return {
        "samples": total,
        "accuracy_fp32": float(correct[0] / total),
        "accuracy_fp8": float(correct[1] / total),
        "agreement": float(agree / total),
    }
