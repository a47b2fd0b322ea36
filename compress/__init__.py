"""compress: a model compression toolchain (pruning, clustering, sub-4-bit quantization).

Python API::

    import compress
    model, tokenizer = compress.load("reports/w4-rtn-smollm2-135m")
"""

__version__ = "0.1.0"


def load(path, device: str = "cpu", verify: bool = True):
    """Load a compressed checkpoint written by `compress run` -> (torch model, tokenizer). ``verify`` checks every
    tensor's hash and every layer's layout first (a CheckpointError names what differs)."""
    from .checkpoint import load_checkpoint

    return load_checkpoint(path, device=device, verify=verify)


__all__ = ["load", "__version__"]
