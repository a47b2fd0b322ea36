"""README.md model cards in the Hugging Face Hub's convention (YAML front matter with ``base_model`` and
``base_model_relation: quantized``): one for a run's output folder (from its report) and one for a serving export
(from its export.json and, when the checkpoint has one, its run's report). Every number comes from those files."""

from __future__ import annotations

from typing import Any

import yaml

from ..models import hub_id
from .cells import fmt_number
from .markdown import quality_and_budgets
from .model import Report

LOAD = {  # folder entry -> how to load it (PATH is the folder holding it)
    "checkpoint": ["```python", "import compress", 'model, tokenizer = compress.load("PATH")', "```",
                   "or `compress generate PATH \"prompt\"`."],
    "compressed-tensors": ["```python", "from transformers import AutoModelForCausalLM  # + compressed-tensors",
                           'model = AutoModelForCausalLM.from_pretrained("PATH")', "```",
                           "vLLM / SGLang: `vllm serve PATH`."],
    "gptq": ["```python", "from transformers import AutoModelForCausalLM  # pip install gptqmodel",
             'model = AutoModelForCausalLM.from_pretrained("PATH")', "```",
             "vLLM: `vllm serve PATH`; TGI: `--quantize gptq`."],
    "gguf": ["`llama-cli -m PATH/model.gguf` or `llama-server -m PATH/model.gguf` (llama.cpp); Ollama: a Modelfile "
             "with `FROM PATH/model.gguf`; transformers: `AutoModelForCausalLM.from_pretrained(\"PATH\", "
             "gguf_file=\"model.gguf\")`."],
    "onnx": ["`compress generate PATH \"prompt\"` (onnxruntime with the exported KV cache), or an onnxruntime "
             "session on `PATH/model.onnx`."],
}


READERS = {"onnx": "onnxruntime"}  # exports whose info names no reader


def _front_matter(base: str | None, tags: list[str]) -> list[str]:
    meta: dict[str, Any] = {}
    if base:
        meta |= {"base_model": base, "base_model_relation": "quantized"}
    meta |= {"pipeline_tag": "text-generation", "tags": ["compress", *tags]}
    return ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]


def _load_section(entries: dict[str, str]) -> list[str]:
    lines = ["## How to load", ""]
    for entry, path in entries.items():
        lines += [f"**{entry}** (`{path}`)", ""] + [x.replace("PATH", path) for x in LOAD[entry]] + [""]
    return lines


def _served_rows(served: dict[str, dict]) -> list[str]:
    rows = ["| export | read back by | perplexity (export) | perplexity (ours) | top-1 agreement | MB |",
            "|---|---|---|---|---|---|"]
    for fmt, info in served.items():
        v = info.get("validation") or {}
        theirs, ours = (v.get(k, v.get(alt)) for k, alt in (("perplexity_export", "perplexity_onnx"),
                                                                 ("perplexity_ours", "perplexity_torch")))
        rows.append(f"| {fmt} | {info.get('reader', READERS.get(fmt, fmt))} | {fmt_number(theirs)} | "
                    f"{fmt_number(ours)} | {fmt_number(v.get('top1_agreement'))} | "
                    f"{info['size']['file_bytes'] / 1e6:.1f} |")
    return rows + [""]


def run_card(r: Report, entries: list[str]) -> str:
    """The model card of a run's output folder; ``entries``: what the folder holds (keys of :data:`LOAD`)."""
    base = hub_id(r.model.spec, r.model.source)
    size = r.size
    bits = sorted({p.get("bits") for p in r.recipe["passes"] if p.get("bits")})
    lines = _front_matter(base, [f"{b}-bit" for b in bits] + [e for e in entries if e != "checkpoint"])
    lines += [f"# {r.model.spec}: {r.name}", "",
              f"{base or r.model.spec} compressed by compress {r.compress_version} with the "
              f"recipe below: {size.compressed_layers_bits_per_weight:.3f} bits per weight over the compressed "
              f"layers, a {size.checkpoint_bytes / 1e6:.1f} MB checkpoint ({size.compression_ratio_vs_fp16:.2f}x "
              "smaller than float16).", ""]
    lines += quality_and_budgets(r, "##")
    lines += [f"Measured on {r.compressed.windows} held-out windows of {r.compressed.seq_len} tokens from "
              f"`{r.recipe['evaluate']['dataset']}` on {r.device}.", ""]
    if r.served:
        lines += ["## Serving exports", ""] + _served_rows(r.served)
    lines += ["## Recipe", "", "```yaml", yaml.safe_dump({"passes": r.recipe["passes"]}, sort_keys=False).rstrip(),
              "```", ""]
    lines += _load_section({e: "." if e == "checkpoint" else e for e in entries})
    return "\n".join(lines)


def export_card(info: dict, report: Report | None, fmt: str) -> str:
    """The model card of a serving export written by ``compress export`` (``info``: its export.json)."""
    base = hub_id(report.model.spec, report.model.source) if report else None
    lines = _front_matter(base, [fmt])
    title = f"{report.model.spec}: {report.name}" if report else info["source"]
    lines += [f"# {title} ({fmt})", "", f"The compressed checkpoint `{info['source']}` in the {fmt} format, "
              "written with its very codes and scales by compress, read back by the "
              "format's reader and compared with the compressed model.", ""]
    if report:
        lines += quality_and_budgets(report, "##")
    if info.get("validation"):
        lines += ["## Read-back check", ""] + _served_rows({fmt: info})
    return "\n".join(lines + _load_section({fmt: "."}))
