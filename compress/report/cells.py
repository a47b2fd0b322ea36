"""What the Markdown, HTML and comparison reports format alike: numbers, and the rows of the ONNX section."""

from __future__ import annotations

from .model import Report


def fmt_number(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def onnx_rows(r: Report) -> list[list[str]]:
    """What the ONNX section of the reports shows (empty when the run exported no ONNX)."""
    o = r.onnx
    if not o:
        return []
    s = o.size
    rows = [["ONNX file (graph + external data)", f"{s['file_bytes'] / 1e6:.2f} MB, "
             f"{s['file_bytes'] / r.size.checkpoint_bytes:.3f}x the checkpoint"],
            ["weights", f"{o.weights}, opset {o.opset}: " +
             ", ".join(f"{n} x {k}" for k, n in o.lowerings.items())]]
    v = o.validation
    if v:
        rows += [["validation vs PyTorch", f"{'passed' if v.passed else 'FAILED'} on {v.windows} x "
                  f"{v.seq_len} tokens + {v.decode_steps} KV-cache steps"],
                 ["max abs logit diff (prefill / decode)", f"{v.max_logit_diff:.2e} / "
                  f"{v.decode_max_logit_diff:.2e} (limit {v.tolerance['max_logit_diff']})"],
                 ["top-1 agreement", f"{v.top1_agreement:.4f}"],
                 ["perplexity onnxruntime / PyTorch", f"{v.perplexity_onnx:.4f} / {v.perplexity_torch:.4f}"]]
    return rows
