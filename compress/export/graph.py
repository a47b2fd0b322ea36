"""A small ONNX graph builder: nodes, initializers and constants with unique names.

Each call of :meth:`Graph.op` appends one node and returns its output name(s), so graph code
reads like the computation it builds: ``y = g.op("MatMul", x, w)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Graph:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.domains: set[str] = set()
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", name: str | None = None,
           **attrs) -> Any:
        """Append one node; its output name (a list of names when ``outputs`` > 1)."""
        base = name or self.name(op_type.lower())
        outs = [base] if outputs == 1 else [f"{base}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain or None, **attrs))
        if domain:
            self.domains.add(domain)
        return outs[0] if outputs == 1 else outs

    def tensor(self, name: str, array: np.ndarray) -> str:
        """An initializer from a numpy array (stored as is)."""
        array = np.asarray(array)  # (np.ascontiguousarray would turn a scalar into shape [1])
        self.initializers.append(numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(), name))
        return name

    def packed(self, name: str, data_type: int, dims: list[int], raw: bytes) -> str:
        """An initializer of a sub-byte type (INT4, UINT2, ...) from its packed bytes."""
        self.initializers.append(helper.make_tensor(name, data_type, dims, vals=raw, raw=True))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared by every node that uses the same value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.tensor(self.name("const"), arr)
        return self._consts[key]

    def forget_const(self, name: str) -> None:
        """The constant ``name`` was removed from the graph: a later :meth:`const` of its value makes a new one."""
        self._consts = {key: value for key, value in self._consts.items() if value != name}

    def arange(self, n: int, divide: int = 1, multiply: int = 1) -> str:
        """int64 ``arange(n) // divide * multiply`` computed in the graph (folded at load, nothing stored)."""
        values = self.op("Range", self.const(0), self.const(n), self.const(1))
        if divide != 1:
            values = self.op("Div", values, self.const(divide))
        return values if multiply == 1 else self.op("Mul", values, self.const(multiply))

    def input(self, name: str, elem_type: int, shape: list, default: np.ndarray | None = None) -> str:
        """A graph input; with ``default``, an optional one: an initializer of the same name holds the value a run
        that does not feed it gets (onnxruntime's overridable initializers; never folded as a constant)."""
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        if default is not None:
            self.tensor(name, default)
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        """Graph output ``name`` holding ``value``: the node that computes it writes it under that name (an Identity
        would copy it on every run: the KV cache, each step), else an Identity for an input or initializer."""
        if not any(value in node.output for node in self.nodes):
            self.op("Identity", value, name=name)
        else:
            for node in self.nodes:
                for names in (node.input, node.output):
                    for i, n in enumerate(names):
                        if n == value:
                            names[i] = name
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def model(self, opset: int, graph_name: str = "decoder") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        model = helper.make_model(graph, opset_imports=imports, producer_name="compress")
        model.ir_version = 10
        return model


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
