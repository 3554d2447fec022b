"""Task: encode the FP8 weights, rewrite the graph, validate and save the FP8 model (fp8core.pipeline.to_fp8)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from tasks.retry import IO_RETRIES

from fp8core.pipeline import Converted, Loaded, ToFP8Config, to_fp8


@task(name="convert-to-fp8", cache_policy=NONE, **IO_RETRIES)
def convert_to_fp8(loaded: Loaded, plans: list, config: ToFP8Config, weights=None) -> Converted:
    return to_fp8(loaded, plans, config, weights)
