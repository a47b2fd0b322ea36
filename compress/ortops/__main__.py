"""``python -m compress.ortops [--force]``: build the custom-operator library (``make setup`` runs it). Never fails
the set-up: without the library, look-up weights are decoded in the ONNX graph and the exporter says so."""

import sys

from . import BuildError, build

try:
    path = build(force="--force" in sys.argv[1:])
    print(f"onnxruntime custom operators: {path}")
except BuildError as e:
    print(f"onnxruntime custom operators not built: {e}", file=sys.stderr)
