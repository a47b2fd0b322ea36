"""report.html: one self-contained page (inline SVG plots, inline CSS, no scripts, no network).

Plots: bits per weight of every layer, its sparsity and reconstruction error where a pass
measured them; perplexity against size (base and compressed); where the time went.
"""

from __future__ import annotations

import html
import io
import re

from .cells import fmt_number, onnx_rows
from .model import Layer, Report

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
.badge{display:inline-block;padding:.2rem .7rem;border-radius:1rem;color:#fff}
.ok{background:#1a7f37}.bad{background:#cf222e}figure{margin:1rem 0}figcaption{color:#555;font-size:.9rem}
"""


def svg(fig) -> str:
    """A matplotlib figure as an inline <svg> element."""
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "compress"  # stable element ids: the same report, the same bytes
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg"):], flags=re.S)
    return text


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_plots(layers: list[Layer]) -> list[tuple[str, str]]:
    """(caption, svg) of per-layer bits per weight, sparsity and reconstruction error."""
    plt = _figure()
    kinds = sorted({layer.name.rsplit(".", 1)[-1] for layer in layers})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    x = range(len(layers))
    c = [colors[layer.name.rsplit(".", 1)[-1]] for layer in layers]
    out = []
    series = [("bits_per_weight", "bits per weight", "Bits per weight of every layer (tables, scales, "
               "indices and outliers included)")]
    if any(layer.note("sparsity") is not None for layer in layers):
        series.append(("sparsity", "sparsity", "Share of pruned weights per layer"))
    if any(layer.note("output_error") is not None for layer in layers):
        series.append(("output_error", "relative output error", "Reconstruction error per layer: "
                       "||(W - Wc) X||^2 / ||W X||^2 on calibration inputs"))
    for key, label, caption in series:
        fig, ax = plt.subplots(figsize=(11, 2.8))
        ax.bar(x, [layer.note(key) or 0 for layer in layers], color=c, width=1.0)
        ax.set_ylabel(label)
        ax.set_xlabel("layer (in model order)")
        ax.set_xlim(-0.5, len(layers) - 0.5)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in kinds]
        ax.legend(handles, kinds, ncol=min(len(kinds), 8), fontsize=7, loc="upper right")
        if key == "output_error":
            ax.set_yscale("log")
        out.append((caption, svg(fig)))
    return out


def size_quality_plot(points: list[dict], title: str = "") -> str:
    """Perplexity against size; ``points``: {label, size_mb, perplexity, pareto?}."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for p in points:
        marker = "*" if p.get("base") else "o"
        ax.scatter(p["size_mb"], p["perplexity"], s=120 if marker == "*" else 50, marker=marker,
                   color="#cf222e" if p.get("pareto") else "#0969da", zorder=3)
        ax.annotate(p["label"], (p["size_mb"], p["perplexity"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    front = sorted((p for p in points if p.get("pareto")), key=lambda p: p["size_mb"])
    if len(front) > 1:
        ax.plot([p["size_mb"] for p in front], [p["perplexity"] for p in front], color="#cf222e", lw=1, zorder=2)
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("perplexity (held-out)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return svg(fig)


def timing_plot(report: Report) -> str:
    plt = _figure()
    t = report.timing
    items = [("load", t.load_seconds), ("evaluate", t.evaluate_seconds)]
    items += [(f"{p.index}: {p.type}", p.seconds) for p in report.passes]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(items) + 1))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#8250df")
    ax.set_xlabel("seconds")
    return svg(fig)


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(r: Report) -> str:
    e = html.escape
    base, comp, size = r.base, r.compressed, r.size
    ok = r.budgets_passed
    parts = [f"<h1>compress report: {e(r.name)} on {e(r.model.spec)}</h1>",
             f"<p><span class='badge {'ok' if ok else 'bad'}' id='verdict'>budgets {'passed' if ok else 'FAILED'}"
             f"</span> recipe hash <code>{e(r.recipe_hash)}</code> · seed {r.recipe['seed']} · "
             f"{e(r.model.family)}, {r.model.parameters:,} parameters</p>"]
    quality_rows = [["base", fmt_number(base.perplexity), "-", "-", fmt_number(base.latency_ms)],
                    ["compressed", fmt_number(comp.perplexity), fmt_number(comp.kl_divergence),
                     fmt_number(comp.top1_agreement), fmt_number(comp.latency_ms)]]
    parts += ["<h2>Quality</h2>", table(["model", "perplexity", "KL vs base", "top-1 agreement",
                                          "decode ms/token"], quality_rows),
              f"<p>{base.tokens} held-out tokens ({base.windows} windows of {base.seq_len}).</p>"]
    if comp.tasks:
        parts.append(table(["task", "base", "compressed"], [[e(t), fmt_number((base.tasks or {}).get(t)),
                                                               fmt_number(a)] for t, a in comp.tasks.items()]))
    parts += ["<h2>Size</h2>", table(["", "bytes", "MB", "bits per weight"], [
        ["base (float16)", size.base_fp16_bytes, f"{size.base_fp16_bytes / 1e6:.2f}", "16"],
        ["compressed checkpoint", size.checkpoint_bytes, f"{size.checkpoint_bytes / 1e6:.2f}",
         f"{size.model_bits_per_weight:.3f}"],
        ["compressed layers", size.compressed_layers_bytes, f"{size.compressed_layers_bytes / 1e6:.2f}",
         f"{size.compressed_layers_bits_per_weight:.3f}"]])]
    points = [{"label": "base fp16", "size_mb": size.base_fp16_bytes / 1e6, "perplexity": base.perplexity,
               "base": True},
              {"label": r.name, "size_mb": size.checkpoint_bytes / 1e6,
               "perplexity": comp.perplexity, "pareto": True}]
    parts.append(f"<figure id='plot-size'>{size_quality_plot(points)}<figcaption>Perplexity against checkpoint "
                 "size</figcaption></figure>")
    if r.onnx:
        parts += ["<h2>ONNX export</h2>", table(["", ""], [[e(a), e(b)] for a, b in onnx_rows(r)])]
    if r.budgets:
        parts += ["<h2>Budgets</h2>", table(["budget", "limit", "actual", "result"], [
            [e(b.name), fmt_number(b.limit), fmt_number(b.actual),
             "<span class='pass'>pass</span>" if b.passed else "<span class='fail'>FAIL</span>"]
            for b in r.budgets])]
    parts += ["<h2>Layers</h2>"]
    for i, (caption, plot) in enumerate(layer_plots(r.layers)):
        parts.append(f"<figure id='plot-layers-{i}'>{plot}<figcaption>{e(caption)}</figcaption></figure>")
    parts += ["<h2>Passes and time</h2>", f"<figure id='plot-time'>{timing_plot(r)}<figcaption>Where the "
              f"{r.timing.total_seconds:.0f} s went</figcaption></figure>",
              table(["#", "pass", "seconds", "options"], [
                  [p.index, e(p.type), f"{p.seconds:.1f}", e(_options(r, p.index))] for p in r.passes])]
    if r.allocation:
        parts.append("<details><summary>Per-layer choices of planning passes</summary><pre>" +
                     e(_json(r.allocation)) + "</pre></details>")
    layer_rows = [[e(x.name), f"{x.shape[0]}x{x.shape[1]}", e(x.format), x.bytes,
                   f"{x.bits_per_weight:.3f}", fmt_number(x.note("output_error"))] for x in r.layers]
    parts += ["<details><summary>All layers</summary>",
              table(["layer", "shape", "format", "bytes", "bits/weight", "output error"], layer_rows), "</details>",
              "<h2>Run</h2><p>peak memory {:.0f} MB · device {} · {}</p>".format(
                  r.peak_memory_mb, e(r.device), e(", ".join(f"{k} {v}" for k, v in r.versions.items())))]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>compress report: "
            f"{e(r.name)}</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def _options(r: Report, index: int) -> str:
    p = r.pass_options(index)
    return ", ".join(f"{k}={v}" for k, v in p.items() if v is not None and v not in (["*"], [], {}))


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=1)
