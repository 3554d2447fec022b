"""The Custom-run form Prefect draws from the flow's parameter schema (issue 12, items 1-3)."""

from __future__ import annotations

import json

from prefect.utilities.callables import parameter_schema

from flows.convert import fp8_convert, run_title
from tasks.params import ConvertParams


def _convert_params_schema() -> dict:
    schema = parameter_schema(fp8_convert).model_dump_for_openapi()
    definitions = schema.get("definitions", {})
    return definitions["ConvertParams"], definitions


def test_no_description_renders_as_a_control():
    params, definitions = _convert_params_schema()
    for name, definition in definitions.items():
        for field, prop in definition.get("properties", {}).items():
            text = prop.get("description", "")
            # Prefect's markdown turns <...> into an editable box whose text is then dropped
            assert "<" not in text, f"{name}.{field}: {text!r}"


def test_every_field_with_a_default_shows_it_in_the_form():
    params, _ = _convert_params_schema()
    for field, info in ConvertParams.model_fields.items():
        if info.is_required():
            continue
        assert "default" in params["properties"][field], f"{field} has a default the form would not show"
    assert params["properties"]["fp8_formats"]["default"] == ["F143", "F152"]


def test_a_form_run_submitting_every_default_is_the_same_as_no_flags():
    form = {k: v for k, v in json.loads(ConvertParams(input_model="m.onnx").model_dump_json()).items()}
    submitted = ConvertParams(**form)
    assert "fp8_params" in submitted.model_fields_set
    assert submitted.fp8_params == ConvertParams(input_model="m.onnx").fp8_params  # so no warning is logged


def test_run_names_tell_runs_apart():
    a = run_title(ConvertParams(input_model="m.onnx", quantize=True, data_preprocess="c.npz"))
    b = run_title(ConvertParams(input_model="m.onnx", quantize=True, data_preprocess="c.npz", quantize_loss_type="mae",
                                weight_granularity="per_channel"))
    c = run_title(ConvertParams(input_model="m.onnx"))
    assert len({a, b, c}) == 3 and "mae" in b and "per_channel" in b and "fast" in c
