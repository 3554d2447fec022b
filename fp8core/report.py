"""What a conversion tells its user: the per-op config and the closing summary."""

from __future__ import annotations

from fp8core.plan import OpPlan


def fp8_config(plans: list[OpPlan], opset: int) -> dict:
    """``fp8_config.json``: every Conv/MatMul/Gemm, FP8 or kept and why, with formats and scales."""
    return {
        "opset": opset,
        "fp8_ops": sum(p.fp8 for p in plans),
        "skipped_ops": sum(not p.fp8 for p in plans),
        "ops": [p.to_dict() for p in plans],
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def summary_lines(result: dict) -> list[str]:
    """The closing summary printed by the CLI, from the flow's result dict."""
    lines = [
        f"FP8 model written to {result['output_model']}",
        f"  ops: {result['fp8_ops']} FP8, {result['skipped_ops']} kept in original precision"
        f" (of {result['fp8_ops'] + result['skipped_ops']} Conv/MatMul/Gemm), opset {result['opset']}",
        f"  size: {human_bytes(result['bytes_before'])} -> {human_bytes(result['bytes_after'])}"
        f" ({100 * result['bytes_after'] / max(result['bytes_before'], 1):.0f}%)",
    ]
    ag = result.get("agreement") or {}
    if ag:
        parts = [f"cosine {ag['output_cosine']:.4f}", f"SNR {ag['output_snr_db']:.1f} dB"] if "output_cosine" in ag else []
        if "output_top1_agreement" in ag:
            parts.append(f"top-1 agreement {ag['output_top1_agreement']:.4f}")
        if "output_label_agreement" in ag:
            parts.append(f"labels equal {ag['output_label_agreement']:.4f}")
        lines.append("  outputs vs the float model (validation inputs): " + ", ".join(parts))
    ev = result.get("evaluation")
    if ev:
        lines.append(
            f"  accuracy on {ev['samples']} labelled samples: FP32 {ev['accuracy_fp32']:.4f}, "
            f"FP8 {ev['accuracy_fp8']:.4f} (top-1 agreement {ev['agreement']:.4f})"
        )
    if result.get("weight_adjust_what"):
        mask = result.get("padding_mask")
        lines.append(f"  weights: {result['weight_adjust_what']}"
                     + (f"; rows of padding tokens ({mask} == 0) left out" if mask else ""))
    if result.get("kept_fp16") is not None:
        lines.append(f"  --num_of_layers_keep_fp16 kept: {', '.join(result['kept_fp16']) or 'none'}")
    if result.get("kept_dominant"):
        lines.append(f"  kept in original precision (each carried >= {result['kept_dominant_share']:g} of the "
                     f"output noise alone): {', '.join(result['kept_dominant'])}")
    if result.get("accuracy_target"):
        lines.append(f"  accuracy target: {result['accuracy_target']}")
    for key, label in (("quantize_log", "quantize.log"), ("precision_compare_log", "precision_compare.log")):
        if result.get(key):
            lines.append(f"  {label}: {result[key]}")
    stages = result.get("seconds", {})
    if stages:
        lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()))
    if result.get("mlflow_run_id"):
        lines.append(f"  MLflow run {result['mlflow_run_id']} in {result['mlflow_uri']}")
    return lines


class ProgressLine:
    """A one-line progress counter on stderr (only on a terminal, so logs and CI stay clean)."""

    def __init__(self, label: str, enabled: bool = True, stream=None):
        import sys

        self.stream = stream or sys.stderr
        self.label = label
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.shown = False

    def update(self, done: int, total: int) -> None:
        if self.enabled:
            width = 24
            filled = width * done // max(total, 1)
            self.stream.write(f"\r{self.label:<8} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
            self.stream.flush()
            self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False
