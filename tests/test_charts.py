"""fp8core.charts: per-op bar charts stay readable with the op names real exports use."""

from __future__ import annotations

import warnings

from fp8core.charts import LABEL_CHARS, per_op_bar_chart, short_label


def test_long_op_names_are_shortened_to_their_start_and_end():
    name = "model_1/cq_t2010v2_1/conv1d_25;model_1/cq_t2010v2_1/conv1d_252;" * 4 + "Conv2D"
    label = short_label(name)
    assert len(label) == LABEL_CHARS and label.startswith(name[:10]) and label.endswith("Conv2D")
    assert short_label("Conv_0") == "Conv_0"


def test_a_chart_of_tensorflow_style_names_lays_out_without_warnings(tmp_path):
    """basic-pitch's op names (hundreds of characters) left matplotlib no room for the bars: it
    warned on stderr on every --quantize run ('Tight layout not applied')."""
    names = [f"model_1/re_lu_{i}/Relu;" * 8 + f"model_1/conv2d_{i}/Conv2D" for i in range(6)]
    path = tmp_path / "chart.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_op_bar_chart(str(path), names, [1e-3, 2e-3, 1e-4, 5e-5, 1e-3, 3e-3], "mse", "loss", log_scale=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
