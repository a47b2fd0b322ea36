"""The rotate pass's online Hadamard transform (QuaRot): the fast transform against the dense product in torch and in
ONNX, and on the real model through a run, its checkpoint and its ONNX export; serving exports whose readers cannot
apply it refuse before any compute."""

import json

import numpy as np
import pytest
import torch
from conftest import SMALL_RUN, cli

from compress.rotation import OnlineHadamard


@pytest.mark.parametrize("order", [1536, 576, 1024, 2048, 12])
def test_the_fast_transform_is_the_dense_product(order):
    """Butterflies for the power-of-two factors and a dense Paley factor in torch, two Kronecker factors in ONNX:
    both equal ``x Q`` with ``Q`` formed densely, and ``Q`` is orthogonal."""
    import onnxruntime as ort

    from compress.export.graph import FLOAT, Graph

    rotation = OnlineHadamard(order, seed=3)
    q = rotation.matrix()
    assert torch.allclose(q @ q.T, torch.eye(order, dtype=torch.float64), atol=1e-12)
    x = torch.randn(2, 5, order, generator=torch.Generator().manual_seed(order), dtype=torch.float64)
    assert (rotation(x) - x @ q).abs().max() < 1e-12
    g = Graph()
    g.output(rotation.onnx_apply(g, g.input("x", FLOAT, ["batch", "sequence", order])), "y", FLOAT,
             ["batch", "sequence", order])
    got = ort.InferenceSession(g.model(21).SerializeToString()).run(None, {"x": x.float().numpy()})[0]
    assert np.abs(got - (x @ q).numpy()).max() < 1e-5
    assert sum(n.op_type == "MatMul" for n in g.nodes) == 2  # no n x n matrix


@pytest.mark.parametrize("order", [18944, 11008])
def test_an_order_without_a_small_hadamard_construction_is_refused(order):
    """18944 (= 37 x 512): no construction here; 11008 (= 5504 x 2): only through a Paley factor too large to multiply
    densely at run time."""
    with pytest.raises(ValueError, match=f"no Hadamard matrix of order {order}"):
        OnlineHadamard(order, 0)


def test_online_rotation_runs_through_a_run_its_checkpoint_and_onnx(write_recipe, tmp_path):
    """rotate (online) + 8-bit RTN on the real model: the checkpoint records the transform and a loaded model applies
    it (the same perplexity as the run's), and the ONNX export applies it too (validated against PyTorch)."""
    import compress
    from compress.data import evaluation_windows
    from compress.evaluate import evaluate

    recipe = write_recipe(f"name: o\n{SMALL_RUN}passes:\n  - {{type: rotate, online: true}}\n"
                          "  - {type: rtn, bits: 8, group_size: 64}\nexport:\n  onnx: {windows: 1, seq_len: 128}\n")
    result = cli("run", recipe, "smollm2-135m", "--out", tmp_path / "o", "--quiet")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["compress_online_hadamard"] == {"layers": ["mlp.down_proj"], "kind": "hadamard", "order": 1536,
                                                  "seed": 0}
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["onnx"]["validation"]["passed"] and report["onnx"]["validation"]["max_logit_diff"] < 1e-2
    model, tok = compress.load(tmp_path / "o")
    assert all(model.get_submodule(f"model.layers.{i}.mlp.down_proj").input_rotation is not None for i in range(30))
    windows = evaluation_windows("pydoc", tok, 128, 1, "pydoc")
    loaded = evaluate(model, windows)[0].perplexity
    assert loaded == pytest.approx(report["compressed"]["perplexity"], rel=1e-3)
    for layer in model.model.layers:  # without the transform the stored W Q reads the wrong basis
        layer.mlp.down_proj._forward_pre_hooks.clear()
    assert evaluate(model, windows)[0].perplexity > 2 * loaded


@pytest.mark.parametrize("target", ["gguf", "compressed_tensors"])
def test_serving_exports_refuse_an_online_rotation_before_any_compute(target, write_recipe, tmp_path):
    recipe = write_recipe(f"name: r\n{SMALL_RUN}passes:\n  - {{type: rotate, online: true}}\n"
                          f"  - {{type: rtn, bits: 4, group_size: 32}}\nexport:\n  {target}: {{}}\n")
    result = cli("run", recipe, "smollm2-135m", "--out", tmp_path / "r", "--quiet")
    assert result.exit_code == 2 and "at run time" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.gpu
def test_on_a_gpu_the_rotated_layer_runs_the_kernel_on_the_transformed_input():
    """CUDA: the transform (butterflies on the GPU) before our CuPy kernel equals the dense product."""
    from compress import kernels
    from compress.formats import quantize_rtn
    from compress.modules import CompressedLinear, rotate_input
    from compress.quant import QuantSpec

    if not (torch.cuda.is_available() and kernels.cupy_available()):
        pytest.skip("needs an NVIDIA GPU and CuPy")
    rotation = OnlineHadamard(1536, 1)
    fmt = quantize_rtn(torch.randn(576, 1536), QuantSpec(4, 64))
    layer = CompressedLinear(fmt, compute_dtype=torch.float16).cuda().half()
    rotate_input(layer, rotation)
    x = torch.randn(3, 1536, device="cuda", dtype=torch.float16)
    assert (rotation(x.float()) - x.float() @ rotation.matrix().float().cuda()).abs().max() < 1e-3
    want = (x.double() @ rotation.matrix().cuda()).float() @ fmt.dequantize().cuda().T
    got = layer(x).float()
    assert (got - want).abs().max() <= 4e-3 * want.abs().max()
