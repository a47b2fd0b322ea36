import pytest
import torch

from compress.formats import DenseWeight, QuantizedWeight, format_from_saved, quantize_rtn
from compress.quant import QuantSpec, grid_values


@pytest.fixture(scope="module")
def weight(smol):
    """A real projection of SmolLM2 (layer 3's gate_proj, 1536 x 576)."""
    return smol[0].model.layers[3].mlp.gate_proj.weight.detach().float().clone()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, 100, None])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantized_weight_round_trips_through_saved_tensors(weight, bits, group_size, symmetric):
    fmt = quantize_rtn(weight, QuantSpec(bits, group_size, symmetric))
    again = format_from_saved(fmt.meta(), fmt.tensors())
    assert torch.equal(again.dequantize(), fmt.dequantize())
    codes, _, _ = fmt.unpacked()
    assert int(codes.max()) < 2**bits


def test_exact_size_accounting(weight):
    out, k = weight.shape
    fmt = quantize_rtn(weight, QuantSpec(3, 128, False))
    groups = (k + 127) // 128
    expected = out * ((k * 3 + 7) // 8) + out * groups * 2 + out * ((groups * 3 + 7) // 8)
    assert fmt.nbytes() == expected
    assert fmt.bytes_by_part() == {"codes": out * k * 3 // 8, "scales": out * groups * 2,
                                   "zeros": out * ((groups * 3 + 7) // 8)}


def test_error_falls_with_bits(weight):
    errs = [(quantize_rtn(weight, QuantSpec(b, 64)).dequantize() - weight).pow(2).mean() for b in (2, 3, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > errs[3]


def test_short_last_group_keeps_its_own_range():
    w = torch.cat([torch.randn(4, 128), 100 * torch.randn(4, 16)], dim=1)  # last group of 16 is much wider
    fmt = quantize_rtn(w, QuantSpec(4, 128))
    assert fmt.scales.shape == (4, 2)
    err_first = (fmt.dequantize()[:, :128] - w[:, :128]).abs().max()
    assert err_first < 0.5  # the wide last group did not inflate the first group's scale


def test_non_uniform_grids():
    assert grid_values("nf", 4).numel() == 16 and grid_values("nf", 3).numel() == 8
    assert float(grid_values("nf", 4).abs().max()) == 1.0 and 0.0 in grid_values("nf", 4).tolist()
    assert sorted(set(grid_values("fp4", 4).mul(6).abs().tolist())) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_clip_search_never_increases_group_error(weight):
    plain = quantize_rtn(weight, QuantSpec(3, 64, clip_search=False)).dequantize()
    searched = quantize_rtn(weight, QuantSpec(3, 64, clip_search=True)).dequantize()
    err = lambda d: (d - weight).abs().pow(2.4).sum()  # noqa: E731
    assert err(searched) <= err(plain)


def test_dense_weight_round_trip():
    w = torch.randn(8, 5)
    fmt = DenseWeight(w)
    assert fmt.nbytes() == 80 and isinstance(format_from_saved(fmt.meta(), fmt.tensors()), DenseWeight)
    assert QuantizedWeight.kind != DenseWeight.kind


def test_a_new_format_is_one_class(weight, tmp_path):
    """DESIGN.md's promise: a format written in one place (here, in this test) is saved, read back and verified
    against its declared layout, counted, run by CompressedLinear and exported to ONNX (onnxruntime computes
    x @ W.T) with no other change."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto

    from compress.export.graph import Graph
    from compress.export.weights import WeightLowering
    from compress.formats import FORMATS, WeightFormat, register_format
    from compress.formats.base import LayoutError
    from compress.formats.onnx_ops import as_float
    from compress.modules import CompressedLinear

    @register_format
    class RowScaledInt8(WeightFormat):
        """int8 codes with one float16 scale per output row."""

        kind = "test-row-int8"

        def __init__(self, codes, scales):
            self.codes, self.scales, self.shape = codes, scales, tuple(codes.shape)

        @classmethod
        def quantize(cls, w):
            scales = (w.abs().amax(1) / 127).clamp_min(1e-8).half()
            return cls(torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8), scales)

        def dequantize(self):
            return self.codes.float() * self.scales.float()[:, None]

        def tensors(self):
            return {"codes": self.codes, "scales": self.scales}

        def meta(self):
            return {"kind": self.kind, "shape": list(self.shape)}

        @classmethod
        def from_saved(cls, meta, tensors):
            return cls(tensors["codes"], tensors["scales"])

        @classmethod
        def layout(cls, meta):
            rows, cols = meta["shape"]
            return {"codes": ((torch.int8,), (rows, cols)), "scales": ((torch.float16,), (rows,))}

        def onnx_weight(self, g, prefix):
            scale = g.op("Unsqueeze", as_float(g, f"{prefix}.scales", self.scales), g.const([1]))
            return g.op("Mul", g.op("Cast", g.tensor(f"{prefix}.codes", self.codes.numpy()), to=TensorProto.FLOAT),
                        scale)

    try:
        fmt = RowScaledInt8.quantize(weight)
        again = format_from_saved(fmt.meta(), fmt.tensors())
        assert torch.equal(again.dequantize(), fmt.dequantize())
        with pytest.raises(LayoutError, match="tensor scales is float32"):
            format_from_saved(fmt.meta(), {**fmt.tensors(), "scales": fmt.scales.float()})
        assert fmt.nbytes() == weight.numel() + 2 * weight.shape[0]
        assert fmt.kernel_plan() is None  # no GPU kernel declared: CompressedLinear takes the torch path
        x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        want = x @ fmt.dequantize().T
        torch.testing.assert_close(CompressedLinear(fmt)(x), want)
        g = Graph()
        low = WeightLowering(g)
        y = low.linear(g.input("x", TensorProto.FLOAT, [3, weight.shape[1]]), fmt, None, "layer")
        g.output(y, "y", TensorProto.FLOAT, [3, weight.shape[0]])
        got = ort.InferenceSession(g.model(21).SerializeToString()).run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
        assert low.layers["layer"].lowering.startswith("in-graph decode")
    finally:
        FORMATS.pop("test-row-int8", None)
