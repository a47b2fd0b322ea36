"""Compressed weight formats, one module per family, each owning its layout, exact bytes, decode, GPU
launch plan and ONNX lowering (see ``base``). Importing this package registers every format."""

from .base import FORMATS, NoKernel, WeightFormat, format_from_saved, register_format
from .dense import DenseWeight
from .grid import QuantizedWeight, grid_weight, quantize_rtn
from .kquant import KQuantWeight
from .outliers import OutlierWeight
from .palette import TABLE_DTYPES, PalettizedWeight, quantize_table, stored_table
from .sparse import SparseWeight, compact, nm_pattern
from .vector import VectorWeight

__all__ = ["FORMATS", "NoKernel", "WeightFormat", "format_from_saved", "register_format", "DenseWeight",
           "QuantizedWeight", "grid_weight", "quantize_rtn", "KQuantWeight", "OutlierWeight", "TABLE_DTYPES",
           "PalettizedWeight", "quantize_table",
           "stored_table", "SparseWeight", "compact", "nm_pattern", "VectorWeight"]
