"""Which positions of the last hidden state the output head reads, in the two graphs an export writes.

``model.onnx`` takes an optional ``logits_to_keep`` [1] (transformers' meaning: the logits of the last k positions
only; 0, the default when it is not fed, all of them): validation reads every position, a generation loop feeds 1.

``genai.onnx`` (what ``genai_config.json`` names) is the same graph whose head reads one position a row: its last
real token, the last position whose ``attention_mask`` is 1 among the ones this run appends (right or left padded
batches alike), with ``logits`` declared ``[batch, 1, vocab]``. onnxruntime-genai feeds no ``logits_to_keep``; from
that declared shape it takes the logits as the sampling ones ("trimmed prefill logits", since its 0.13), so a
prompt chunk neither computes nor holds a ``[chunk, vocab]`` logits buffer (onnxruntime-genai's model builder calls
this ``prune_lm_head``, which reads the last position whatever the padding).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import INT64, Graph

KEEP_INPUT = "logits_to_keep"
KEPT = "kept_positions"  # the node (and its output) that selects the head's positions


def kept_positions(g: Graph, x: str) -> str:
    """The positions of ``x`` [batch, seq, hidden] the head reads: the last ``logits_to_keep`` (0, the default when
    the input is not fed: all). Generating needs the last position's logits only; the whole prompt's are a
    [seq, vocab] buffer (48 MiB for 256 tokens of a 49k vocabulary) and a head matmul over every prompt token."""
    keep = g.input(KEEP_INPUT, INT64, [1], default=np.zeros(1, np.int64))
    return g.op("Slice", x, g.op("Neg", keep), g.const([np.iinfo(np.int64).max]), g.const([1]), name=KEPT)


def last_token_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the decoder graph ``model`` (loaded without its external data, which the copy references as it
    is) whose head reads each row's last real token only: ``logits`` [batch, 1, vocab]."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    hidden, negated = next(n for n in graph.node if n.name == KEPT).input[:2]
    kept = [n for n in graph.node if n.name != KEPT and negated not in n.output]
    for field in (graph.input, graph.initializer):
        for item in [i for i in field if i.name == KEEP_INPUT]:
            field.remove(item)

    def const(name: str, value) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), f"{KEPT}/{name}"))
        return f"{KEPT}/{name}"

    def node(op: str, *inputs: str, **attrs) -> str:
        name = f"{KEPT}/{op}_{len(nodes)}"
        nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    nodes: list[onnx.NodeProto] = []
    appended = node("Shape", "input_ids", start=1, end=2)  # this run's tokens; the mask covers past and them
    tail = node("Cast", node("Slice", "attention_mask", node("Neg", appended), const("end", [np.iinfo(np.int64).max]),
                             const("axis", [1])), to=TensorProto.FLOAT)
    last = node("ArgMax", tail, axis=1, keepdims=1, select_last_index=1)  # [batch, 1]; all padding: the last
    width = node("Concat", node("Shape", hidden, start=0, end=1), const("one", [1]),
                 node("Shape", hidden, start=2, end=3), axis=0)
    index = node("Expand", node("Unsqueeze", last, const("axes", [2])), width)
    nodes.append(helper.make_node("GatherElements", [hidden, index], [KEPT], name=KEPT, axis=1))
    at = next(i for i, n in enumerate(kept) if KEPT in n.input)  # before the first reader: a sorted graph
    del graph.node[:]
    graph.node.extend(kept[:at] + nodes + kept[at:])
    read = {name for n in graph.node for name in n.input}
    for unread in [t for t in graph.initializer if t.name not in read]:  # the old slice's constants, if its own
        graph.initializer.remove(unread)
    logits = next(o for o in graph.output if o.name == "logits").type.tensor_type.shape.dim[1]
    logits.Clear()
    logits.dim_value = 1
    return out
