"""Task: accuracy of the float and FP8 models on labelled data."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from fp8core.pipeline import EvaluateConfig, Evaluated, evaluate


@task(name="evaluate-accuracy", cache_policy=NONE)
def evaluate_accuracy(float_model, fp8_model, config: EvaluateConfig) -> Evaluated:
    return evaluate(float_model, fp8_model, config)
