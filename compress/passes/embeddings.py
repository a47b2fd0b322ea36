"""Quantize the token embedding and the output head: the two tables outside the decoder blocks.

On a small model they are most of what a 4-bit checkpoint still stores in fp16 (a 49k x 576 table tied to the head
is half of SmolLM2-135M's file). The head is quantized by GPTQ ("GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", Frantar et al., 2022) on the Hessian of its inputs, the final hidden states
of the compressed model over the calibration (``method: gptq``), or by round-to-nearest (``method: rtn``). A tied
table is one matrix for both uses: its groups run along the hidden dimension, which is the head's input dimension
and an embedding row's length, so one format serves the lookup (decoding only the rows asked for) and the head's
matmul. An untied input embedding, which sees no statistics a lookup could use, is rounded to nearest.

This pass runs after the last block, whatever its place in the recipe.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..formats import quantize_rtn
from ..hessian import output_error
from ..modules import CompressedEmbedding, CompressedLinear, embeddings_tied
from ..quant import QuantSpec
from .base import Pass, PassConfig, Requirements, current_weight
from .gptq import gptq_quantize
from .registry import register


class EmbeddingsConfig(PassConfig):
    type: Literal["embeddings"] = "embeddings"
    bits: int = Field(4, ge=2, le=8, description="bits per weight code (2-8)")
    group_size: int | None = Field(32, ge=1, description="hidden channels sharing one scale; null = one per row")
    symmetric: bool = Field(False, description="symmetric grid (no stored zero point)")
    method: Literal["gptq", "rtn"] = Field("gptq", description="gptq: error feedback on the head's input Hessian "
                                           "(calibration); rtn: round to nearest (data-free)")
    head: bool = Field(True, description="quantize the output head (with tied embeddings: the shared table)")
    embedding: bool = Field(True, description="quantize the input token embedding (with tied embeddings: the "
                            "shared table)")
    clip_search: bool = Field(True, description="search a clipping range minimising the error")
    damp: float = Field(0.01, gt=0, le=1, description="GPTQ dampening, fraction of the mean Hessian diagonal")
    act_order: bool = Field(True, description="GPTQ: quantize columns by decreasing activation energy")

    def applies_to(self, name: str) -> bool:
        """No layer inside the blocks: this pass's tables are outside them (``targets`` does not apply)."""
        return False


@register
class Embeddings(Pass):
    name = "embeddings"
    stage = "quantize"
    Config = EmbeddingsConfig

    def spec(self) -> QuantSpec:
        c = self.cfg
        return QuantSpec(c.bits, c.group_size, c.symmetric, "int", c.clip_search)

    def requirements(self) -> Requirements:
        return Requirements(head_inputs=self.cfg.head and self.cfg.method == "gptq")

    def written_grids(self) -> list[QuantSpec]:
        return [self.spec()] if self.cfg.head or self.cfg.embedding else []

    def ends_written(self) -> list[str]:
        return [part for part in ("embedding", "head") if getattr(self.cfg, part)]

    def compress_ends(self, model, head_stats):
        cfg, notes = self.cfg, {}
        tied = embeddings_tied(model)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        emb_name, head_name = _module_name(model, emb), _module_name(model, head) if head is not None else None
        if head is not None and (cfg.head or (tied and cfg.embedding)):
            w = current_weight(head)
            if cfg.head and cfg.method == "gptq" and head_stats is not None:
                h = head_stats.mean_hessian().cpu()
                fmt = gptq_quantize(w, h, self.spec(), damp=cfg.damp, act_order=cfg.act_order, refit=True)
                note = {"format": fmt.describe(), "output_error": output_error(w, fmt.dequantize(), h)}
            else:
                fmt = quantize_rtn(w, self.spec())
                note = {"format": fmt.describe()}
            model.set_output_embeddings(CompressedLinear.from_module(head, fmt))
            if tied:
                model.set_input_embeddings(CompressedEmbedding.from_module(emb, fmt))
                note["tied"] = head_name
                notes[emb_name] = note
            else:
                notes[head_name] = note
        if cfg.embedding and not tied:
            weight = emb.fmt.dequantize() if isinstance(emb, CompressedEmbedding) else emb.weight.detach().float()
            fmt = quantize_rtn(weight, self.spec())
            model.set_input_embeddings(CompressedEmbedding.from_module(emb, fmt))
            notes[emb_name] = {"format": fmt.describe()}
        return notes


def _module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
