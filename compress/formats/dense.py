"""An uncompressed weight: float16 / bfloat16 / float32 values as they are."""

from __future__ import annotations

import torch

from .base import FLOATS, WeightFormat, register_format


@register_format
class DenseWeight(WeightFormat):
    """An uncompressed weight stored in float16/bfloat16/float32."""

    kind = "dense"

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float16):
        self.weight = weight.detach().to(dtype).contiguous()
        self.shape = (int(self.weight.shape[0]), int(self.weight.shape[1]))

    def dequantize(self):
        return self.weight.float()

    def tensors(self):
        return {"weight": self.weight}

    def meta(self):
        return {"kind": self.kind, "shape": list(self.shape)}

    @classmethod
    def from_saved(cls, meta, tensors):
        w = tensors["weight"]
        return cls(w, w.dtype)

    @classmethod
    def layout(cls, meta):
        return {"weight": (FLOATS, tuple(meta["shape"]))}

    def describe(self):
        return f"dense {str(self.weight.dtype).removeprefix('torch.')}"

    def kernel_values(self, kept):
        """As the kept values of a sparse layout: fp16 values read directly."""
        from ..kernels.plan import DENSE, ValuePlan, empty_dims

        dims = empty_dims()
        dims["value_cols"] = kept
        return ValuePlan(DENSE, dims, {"values": self.weight.half()})

    def kernel_plan(self):
        return None  # a dense matmul is cuBLAS's

    def onnx_weight(self, g, prefix):
        from .onnx_ops import as_float

        return as_float(g, f"{prefix}.weight", self.weight)

    def onnx_matmul(self, lowering, x, name):
        from .onnx_custom import half_matmul
        from .onnx_ops import as_float

        dtype = str(self.weight.dtype).removeprefix("torch.")
        if self.weight.dtype in (torch.float16, torch.bfloat16):  # read as stored by our operator, when built
            y = half_matmul(lowering, x, name, self.weight, self.shape)
            if y is not None:
                return f"HalfMatMul {dtype}", y
        # stored transposed: MatMul reads [in, out]; float16 is cast to float32 at load (exact activations)
        return f"dense {dtype}", lowering.g.op("MatMul", x, as_float(lowering.g, f"{name}.weight_t", self.weight.t()))
