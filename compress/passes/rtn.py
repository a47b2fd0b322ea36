"""Round-to-nearest (RTN) weight quantization: the data-free baseline.

Each group of ``group_size`` inputs of each output row gets its own scale (and zero point);
weights are rounded to the nearest grid point. With ``clip_search`` the range of every group is
shrunk over a small grid to minimise the rounding error (as in the GPTQ reference quantizer).
Non-uniform grids (NF / FP4) follow QLoRA (Dettmers et al., 2023).
"""

from typing import Literal

from pydantic import Field, model_validator

from ..formats import quantize_rtn
from ..quant import QuantSpec
from .base import Pass, PassConfig, current_weight
from .registry import register


class QuantOptions(PassConfig):
    bits: int = Field(4, ge=2, le=8, description="bits per weight code (2-8)")
    group_size: int | None = Field(
        128, ge=1, description="inputs sharing one scale; null = one scale per output row")
    symmetric: bool = Field(False, description="symmetric grid (no stored zero point)")
    grid: Literal["int", "nf", "fp4"] = Field(
        "int", description="int: uniform; nf: NormalFloat (QLoRA); fp4: E2M1 (4 bits only)")
    clip_search: bool = Field(False, description="search a clipping range minimising the error")

    @model_validator(mode="after")
    def _check_grid(self):
        if self.grid == "fp4" and self.bits != 4:
            raise ValueError("grid 'fp4' (E2M1) needs bits: 4")
        if self.grid != "int" and self.bits > 4:
            raise ValueError(f"grid '{self.grid}' supports 2-4 bits; use grid: int for more")
        return self

    def spec(self) -> QuantSpec:
        symmetric = self.symmetric or self.grid != "int"
        return QuantSpec(self.bits, self.group_size, symmetric, self.grid, self.clip_search)


class RTNConfig(QuantOptions):
    type: Literal["rtn"] = "rtn"


@register
class RTN(Pass):
    name = "rtn"
    stage = "quantize"
    Config = RTNConfig

    def compress_layer(self, name, module, stats, cfg):
        fmt = quantize_rtn(current_weight(module), cfg.spec())
        return fmt, {"format": fmt.describe()}
