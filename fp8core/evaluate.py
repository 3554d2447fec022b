"""Top-1 accuracy of a float and an FP8 model on labelled data (the demo's `label` column)."""

from __future__ import annotations

import numpy as np
import onnx

from fp8core.calibration import open_dataset
from fp8core.graph import graph_inputs
from fp8core.model import Model
from fp8core.runtime import make_session


def evaluate_top1(
    float_model: Model | onnx.ModelProto,
    fp8_model: Model | onnx.ModelProto,
    data_path: str,
    label_column: str = "label",
    batch_size: int = 64,
) -> dict:
    """Accuracy of both models (argmax of the first output) and how often they agree."""
    source = open_dataset(data_path)
    if label_column not in source.columns:
        raise ValueError(f"evaluation data {data_path!r} has no {label_column!r} column")
    names = [i.name for i in graph_inputs(Model.of(float_model).graph)]
    sessions = [make_session(float_model), make_session(fp8_model)]
    correct = np.zeros(2, dtype=np.int64)
    agree = total = 0
    for batch in source.iter_batches(batch_size, names + [label_column]):
        labels = batch.pop(label_column).reshape(-1)
        feeds = {n: batch[n] for n in names}
        preds = [s.run(None, feeds)[0].argmax(axis=-1).reshape(-1) for s in sessions]
        correct += [(p == labels).sum() for p in preds]
        agree += int((preds[0] == preds[1]).sum())
        total += labels.size
    return {
        "samples": total,
        "accuracy_fp32": float(correct[0] / total),
        "accuracy_fp8": float(correct[1] / total),
        "agreement": float(agree / total),
    }
