"""Tasks: encode the FP8 weights, rewrite the graph, validate and save the FP8 model."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from tasks.retry import IO_RETRIES

from fp8core.model import Model
from fp8core.modelio import validate_fp8_model
from fp8core.plan import OpPlan
from fp8core.rewrite import encode_weights as _encode, rewrite_to_fp8


@task(name="encode-weights", cache_policy=NONE)
def encode_weights(model: Model, plans: list[OpPlan]):
    return _encode(model, plans)


@task(name="rewrite-graph", cache_policy=NONE)
def rewrite_graph(model: Model, plans: list[OpPlan], encoded) -> Model:
    """The FP8 model; weights it keeps in float may still be on disk beside the input model."""
    return model.derive(rewrite_to_fp8(model, plans, encoded))


@task(name="validate-and-save", cache_policy=NONE, **IO_RETRIES)
def validate_and_save(model: Model, path: str, external_data: str = "auto",
                      release: bool = False, feeds=None) -> tuple[int, dict[str, float]]:
    """Write atomically (external data past 2 GB), validating the written copy before it replaces ``path``.

    ``release``: the caller is done with ``model``; its weights are dropped once written.
    ``feeds``: a :class:`fp8core.validation.Reference` (inputs of real shapes and the float
    outputs there). Returns the bytes written and the FP8 outputs' agreement with the float ones.
    """
    agreement: dict[str, float] = {}

    def check(written: str) -> None:
        agreement.update(validate_fp8_model(written, feeds))

    size = model.save(path, external_data, check=check, release=release)
    return size, agreement
