"""CompressedLinear and CompressedEmbedding: ``nn.Linear`` and ``nn.Embedding`` replacements whose weight is a
format object (a tied output head and token embedding share one)."""

from contextlib import contextmanager

import torch
from torch import nn

from . import kernels
from .formats import WeightFormat


class CompressedLinear(nn.Module):
    """Holds a :class:`WeightFormat`; forward goes through a CUDA kernel when one exists for the
    format and the input is on a GPU, else through the torch reference path (dequantize + matmul).
    """

    def __init__(self, fmt: WeightFormat, bias: torch.Tensor | None = None, compute_dtype=torch.float32):
        super().__init__()
        self.fmt = fmt
        self.in_features, self.out_features = fmt.shape[1], fmt.shape[0]
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype
        self._cached_weight: torch.Tensor | None = None
        self._device = torch.device("cpu")

    @classmethod
    def from_module(cls, module: nn.Module, fmt: WeightFormat) -> "CompressedLinear":
        """A CompressedLinear replacing ``module`` (an nn.Linear or a CompressedLinear), with its input rotation."""
        if isinstance(module, CompressedLinear):
            new = cls(fmt, module.bias, module.compute_dtype)
            new._device = module._device
        else:
            weight = linear_weight(module)
            new = cls(fmt, module.bias if isinstance(module.bias, torch.Tensor) else None, weight.dtype)
            new._device = weight.device
        rotation = getattr(module, "input_rotation", None)
        if rotation is not None:
            rotate_input(new, rotation)
        return new

    def dense_weight(self) -> torch.Tensor:
        """The weight the format represents, in the compute dtype, on the module's device."""
        if self._cached_weight is not None:
            return self._cached_weight
        on_gpu = kernels.dequantize(self.fmt, self._device, self.compute_dtype)  # None off the GPU
        return on_gpu if on_gpu is not None else self.fmt.dequantize().to(self._device, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self._cached_weight is None:
            y = kernels.compressed_matmul(self.fmt, x)
            if y is not None:
                return y if self.bias is None else y + self.bias
        return nn.functional.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def _apply(self, fn, recurse=True):
        # Track the device for the reference path; format tensors stay where they are stored.
        probe = fn(torch.empty(0, device=self._device, dtype=self.compute_dtype))
        self._device, self.compute_dtype = probe.device, probe.dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.fmt.describe()}"


class CompressedEmbedding(nn.Module):
    """A token embedding whose table ``[vocab, hidden]`` is a :class:`WeightFormat`: a lookup decodes only the rows
    of the tokens asked for (``WeightFormat.take_rows``). ``embed_scale`` (Gemma's sqrt(hidden), kept from the
    module replaced) multiplies the rows as the original module did."""

    def __init__(self, fmt: WeightFormat, embed_scale: torch.Tensor | None = None, compute_dtype=torch.float32):
        super().__init__()
        self.fmt = fmt
        self.num_embeddings, self.embedding_dim = fmt.shape
        self.compute_dtype = compute_dtype
        self.embed_scale = embed_scale.detach().clone() if embed_scale is not None else None
        self._cached_weight: torch.Tensor | None = None  # a whole decoded table standing in for the format

    @classmethod
    def from_module(cls, module: nn.Module, fmt: WeightFormat) -> "CompressedEmbedding":
        weight = getattr(module, "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else getattr(module, "compute_dtype", torch.float32)
        return cls(fmt, getattr(module, "embed_scale", None), dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._cached_weight is not None:
            out = nn.functional.embedding(input_ids, self._cached_weight)
        else:
            rows = self.fmt.take_rows(input_ids.reshape(-1).cpu()).to(input_ids.device, self.compute_dtype)
            out = rows.reshape(*input_ids.shape, self.embedding_dim)
        return out if self.embed_scale is None else out * self.embed_scale.to(out.device, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.fmt.describe()}"


FORMAT_MODULES = (CompressedLinear, CompressedEmbedding)  # modules whose weight is a format object


def embeddings_tied(model) -> bool:
    """Whether the model's (a transformers PreTrainedModel's) output head computes with its token embedding's table
    (the same tensor, or the same format object once both are compressed)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return any(getattr(emb, attr, None) is getattr(head, attr, False) for attr in ("fmt", "weight"))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``weight`` tensor of a linear-like module (``nn.Linear`` and friends)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


@contextmanager
def dequantized_weights(model: nn.Module):
    """Dequantize every CompressedLinear once for the duration of the block (fast evaluation on
    CPU at the cost of dense-weight memory); the result is numerically the same as the
    reference path."""
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    try:
        for m in layers:
            m._cached_weight = m.dense_weight()
        yield
    finally:
        for m in layers:
            m._cached_weight = None


ONLINE_ROTATION = "compress_online_hadamard"  # the model config's record: {"layers": [suffixes], **rotation.meta()}


def restore_input_rotations(model: nn.Module) -> None:
    """Re-attach the run-time input rotations the model config records (a loaded checkpoint's layers store ``W Q``
    and must read ``x Q``)."""
    spec = getattr(model.config, ONLINE_ROTATION, None)
    if not spec:
        return
    rotation = rotation_from_meta(spec)
    for name, module in model.named_modules():
        if any(name.endswith("." + layer) for layer in spec["layers"]):
            rotate_input(module, rotation)


def rotation_from_meta(meta: dict):
    """The input rotation ``meta`` (``OnlineHadamard.meta``) describes."""
    from .rotation import OnlineHadamard

    return OnlineHadamard(int(meta["order"]), int(meta["seed"]))


def rotate_input(module: nn.Module, rotation) -> None:
    """``module`` (a linear layer storing ``W Q``) reads ``rotation(x) = x Q`` at run time: a forward pre-hook, so
    every later hook (the calibration statistics) and every path of its forward (torch, the GPU kernels) sees the
    rotated input. ``module.input_rotation`` names it for the checkpoint and the exporters."""
    attached = getattr(module, "input_rotation", None) is not None
    module.input_rotation = rotation
    if not attached:  # one hook, however often it is attached
        module.register_forward_pre_hook(_rotated_input)


def _rotated_input(module: nn.Module, args: tuple) -> tuple:
    rotation = getattr(module, "input_rotation")  # noqa: B009 - set by rotate_input (mypy sees nn.Module's attrs)
    return (rotation(args[0]), *args[1:])


def parameter_count(model: nn.Module) -> int:
    """Weights the model represents: its (deduplicated) parameters plus compressed weights."""
    dense = sum(p.numel() for p in model.parameters())
    formats = {id(m.fmt): m.fmt for m in model.modules() if isinstance(m, FORMAT_MODULES)}  # a tied one once
    return dense + sum(f.numel for f in formats.values())
