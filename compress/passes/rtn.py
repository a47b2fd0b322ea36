"""Round-to-nearest (RTN) weight quantization: the data-free baseline.

Each group of ``group_size`` inputs of each output row gets its own scale (and zero point);
weights are rounded to the nearest grid point. With ``clip_search`` the range of every group is
shrunk over a small grid to minimise the rounding error (as in the GPTQ reference quantizer).
Non-uniform grids (NF / FP4) follow QLoRA (Dettmers et al., 2023).
"""

from typing import Literal

from ..formats import compact, quantize_rtn
from .base import current_mask, current_weight
from .quantizing import QuantizingPass, QuantOptions
from .registry import register


class RTNConfig(QuantOptions):
    type: Literal["rtn"] = "rtn"


@register
class RTN(QuantizingPass):
    name = "rtn"
    Config = RTNConfig

    def compress_layer(self, name, module, stats, cfg):
        w, mask = current_weight(module), current_mask(module)
        values = quantize_rtn(w if mask is None else compact(w, mask), self.layer_spec(name, cfg, w.shape[1]))
        fmt = self.keep_sparsity(module, values)
        return fmt, {"format": fmt.describe()}
