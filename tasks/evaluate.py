"""Task: accuracy of the float and FP8 models on labelled data."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from fp8core.evaluate import evaluate_top1


@task(name="evaluate-accuracy", cache_policy=NONE)
def evaluate_accuracy(float_model, fp8_model, data_path: str) -> dict:
    return evaluate_top1(float_model, fp8_model, data_path)
