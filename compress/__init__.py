"""compress: a model compression toolchain (pruning, clustering, sub-4-bit quantization).

Python API::

    import compress
    model, tokenizer = compress.load("reports/w4-rtn-smollm2-135m")
"""

__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """Load a compressed checkpoint written by `compress run` -> (torch model, tokenizer)."""
    from .checkpoint import load_checkpoint

    return load_checkpoint(path, device=device)


__all__ = ["load", "__version__"]
