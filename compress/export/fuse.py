"""Sibling low-bit matmuls packed into one kernel: the query, key and value projections read the same input,
as do the gate and up projections of the MLP. When their matmuls (onnxruntime's ``MatMulNBits``, our ``GridMatMul``
and ``LutMatMul``) agree on everything but the output width, their initializers are concatenated along the output
rows (each is stored row by row, so the bytes are the same, only joined) and one kernel followed by a ``Split``
replaces them: fewer, larger calls per token. LutMatMul siblings whose tables end mid-layer (a table per 29 rows of
576) join their tables too, and the packed call gets each row's table index (``row_tables``, 4 bytes a row). A
gate/up split that only feeds the SiLU gating becomes our ``SiluGate`` where our operator library is built.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from ..ortops import DOMAIN
from .graph import Graph

PACKABLE = {("com.microsoft", "MatMulNBits"), (DOMAIN, "GridMatMul"), (DOMAIN, "LutMatMul")}
GRID_TABLE = 4  # GridMatMul's code book input: one for the whole layer, not a row's
LUT_ROW_TABLES = 4  # LutMatMul's optional row -> table input


def _row_tables(widths: list[int], rows_per_table: int) -> np.ndarray | None:
    """Each packed row's table when siblings of ``widths`` rows, a table per ``rows_per_table`` of each, are joined;
    None when every sibling's tables end with it (row n then reads table n // rows_per_table as it is)."""
    if all(w % rows_per_table == 0 for w in widths):
        return None
    parts, first = [], 0
    for w in widths:
        parts.append(first + np.arange(w) // rows_per_table)
        first += -(-w // rows_per_table)
    return np.concatenate(parts).astype(np.int32)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _key(node) -> tuple:
    """What siblings must share: the operator, the input, which tensors they read, every attribute but the output
    width (the input width, the codes' and blocks' layout, the accuracy level)."""
    attrs = _attrs(node)
    attrs.pop("N")
    return (node.domain, node.op_type, node.input[0], tuple(bool(t) for t in node.input[1:]),
            tuple(sorted((k, str(v)) for k, v in attrs.items())))


def _row_wise(node) -> bool:
    """Whether every initializer of ``node`` holds its rows (a LutMatMul: its tables) in order along its first axis,
    so siblings' join: not a GridMatMul code book (the layer's)."""
    if node.op_type == "GridMatMul":
        return len(node.input) <= GRID_TABLE or not node.input[GRID_TABLE]
    return node.op_type != "LutMatMul" or len(node.input) <= LUT_ROW_TABLES  # not packed already


def pack_sibling_matmuls(g: Graph) -> int:
    """Pack every group of low-bit matmuls in ``g`` that read the same input with the same layout and whose
    weights no other node reads. Returns how many groups were packed."""
    uses: dict[str, int] = {}
    for node in g.nodes:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    groups: dict[tuple, list] = {}
    for node in g.nodes:
        if (node.domain, node.op_type) in PACKABLE and _row_wise(node) and \
                all(uses.get(t, 0) == 1 for t in node.input[1:] if t):
            groups.setdefault(_key(node), []).append(node)
    initializers = {t.name: t for t in g.initializers}
    dropped: set[str] = set()
    packed = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        first = nodes[0]
        widths = [int(_attrs(n)["N"]) for n in nodes]
        tensors = []
        for position in range(1, len(first.input)):
            if not first.input[position]:  # an optional input left out, before a present one
                tensors.append("")
                continue
            parts = [numpy_helper.to_array(initializers[n.input[position]]) for n in nodes]
            dropped.update(n.input[position] for n in nodes)
            tensors.append(g.tensor(f"{first.name or first.output[0]}.packed.{position}",
                                    np.concatenate(parts, axis=0)))
        attrs = _attrs(first)
        row_tables = _row_tables(widths, int(attrs.get("rows_per_table", 1))) if first.op_type == "LutMatMul" else None
        if row_tables is not None:
            tensors += [""] * (LUT_ROW_TABLES - 1 - len(tensors))
            tensors.append(g.tensor(f"{first.name or first.output[0]}.packed.row_tables", row_tables))
        joined = g.name("packed_matmul")
        fused = helper.make_node(first.op_type, [first.input[0], *tensors], [joined], name=joined,
                                 domain=first.domain, **{**attrs, "N": sum(widths)})
        split = helper.make_node("Split", [joined, g.const(widths)], [n.output[0] for n in nodes],
                                 name=g.name("split"), axis=-1)
        at = g.nodes.index(first)
        for n in nodes:
            g.nodes.remove(n)
        g.nodes[at:at] = [fused, split]
        packed += 1
    g.initializers[:] = [t for t in g.initializers if t.name not in dropped]
    return packed


def _consumers(g: Graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    consumers: dict[str, list] = {}
    for node in g.nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _drop_split(g: Graph, split) -> None:
    """Remove ``split`` and its sizes initializer when no other node reads it."""
    g.nodes.remove(split)
    if len(split.input) > 1 and split.input[1] and not any(split.input[1] in node.input for node in g.nodes):
        g.initializers[:] = [t for t in g.initializers if t.name != split.input[1]]
        g.forget_const(split.input[1])


def fuse_silu_gates(g: Graph) -> int:
    """A packed gate/up product split in two equal halves only to compute ``gate * sigmoid(gate) * up`` becomes one
    ``compress::SiluGate`` reading the packed tensor (our operator library: one kernel for the split, the sigmoid
    and two multiplications). Returns how many were fused."""
    consumers = _consumers(g)
    initializers = {t.name: t for t in g.initializers}
    fused = 0
    for split in [n for n in g.nodes if n.op_type == "Split" and len(n.output) == 2]:
        gate, up = split.output
        users = {node.op_type: node for node in consumers.get(gate, [])}
        sigmoid, product = users.get("Sigmoid"), users.get("Mul")
        if len(consumers.get(gate, [])) != 2 or sigmoid is None or product is None:
            continue
        if list(product.input) != [gate, sigmoid.output[0]] or consumers.get(sigmoid.output[0]) != [product]:
            continue
        final = consumers.get(product.output[0], [])
        if len(final) != 1 or final[0].op_type != "Mul" or list(final[0].input) != [product.output[0], up] or \
                consumers.get(up) != [final[0]]:
            continue
        sizes = split.input[1] if len(split.input) > 1 and split.input[1] else None
        if sizes is not None and (sizes not in initializers or len(set(numpy_helper.to_array(
                initializers[sizes]).tolist())) != 1):
            continue  # halves of unequal width
        at = g.nodes.index(split)
        for node in (sigmoid, product, final[0]):
            g.nodes.remove(node)
        g.nodes.insert(at, helper.make_node("SiluGate", [split.input[0]], [final[0].output[0]],
                                            name=g.name("silu_gate"), domain=DOMAIN))
        g.domains.add(DOMAIN)
        _drop_split(g, split)
        fused += 1
    return fused
