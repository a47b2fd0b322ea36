"""The generation loop of an exported decoder in onnxruntime: a prompt's prefill, then one token a step with the
KV cache, the way a serving runtime runs it. numpy and onnxruntime only (the session probe runs it without torch).

The cache stays in onnxruntime's values between steps, never copied into numpy arrays. A ``fast`` graph's
attention (``GroupQueryAttention``) appends each step's keys and values to its past buffer in place when the
present output is bound to that same buffer (onnxruntime-genai's ``past_present_share_buffer``): the prefill's
past is a buffer of the whole ``capacity`` (prompt and new tokens), which the prefill's present inherits, and every
decode step then writes one position into it, instead of allocating a cache one position longer and copying the
whole past into it, which holds two caches at once and copies one per step. A ``portable`` graph concatenates past
and new keys: its present is a new tensor every step.
"""

from __future__ import annotations

import numpy as np


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The graph's past inputs and present outputs, key then value for each layer in order."""
    pairs = [(i, kv) for i in range(layers) for kv in ("key", "value")]
    return [f"past_key_values.{i}.{kv}" for i, kv in pairs], [f"present.{i}.{kv}" for i, kv in pairs]


def takes_logits_to_keep(session) -> bool:
    """Whether the graph has the optional ``logits_to_keep`` input (exports since it was added)."""
    return any(i.name == "logits_to_keep" for i in session.get_overridable_initializers())


def cache_in_place(weights: str | None) -> bool:
    """Whether an export of ``weights`` ("fast": ``GroupQueryAttention``) can write its present into its past."""
    return weights == "fast"


class DecodeLoop:
    """Batch-1 greedy-style stepping over ``session`` (an ``onnxruntime.InferenceSession`` of an export whose
    ``export.json`` io block is ``io``); ``in_place``: the graph's attention writes its present into its past
    buffer (``weights: fast``)."""

    def __init__(self, session, io: dict, in_place: bool):
        self.session, self.in_place = session, in_place
        self.kv_heads, self.head_dim, self.vocab = int(io["kv_heads"]), int(io["head_dim"]), int(io["vocab_size"])
        self.past_names, self.present_names = cache_names(int(io["layers"]))
        self.keeps_logits = takes_logits_to_keep(session)
        self.cache: list = []
        self.length = self.capacity = 0
        self._logits = np.empty((1, 1, self.vocab), np.float32)

    def prefill(self, prompt: list[int], capacity: int) -> np.ndarray:
        """Run ``prompt`` from an empty cache; the last position's logits [vocab]. ``capacity``: the most positions
        the cache will hold (prompt and every token to come)."""
        import onnxruntime as ort

        seq = len(prompt)
        if capacity < seq:
            raise ValueError(f"a cache of {capacity} positions cannot hold a {seq}-token prompt")
        # the past is read only up to the positions the mask counts (none here): in place, its buffer is left
        # unwritten (no pages touched) and becomes the present the steps write into
        past_length = capacity if self.in_place else 0
        past = [ort.OrtValue.ortvalue_from_shape_and_type([1, self.kv_heads, past_length, self.head_dim], np.float32)
                for _ in self.past_names]
        feed = {"input_ids": np.array([prompt], np.int64), "attention_mask": np.ones((1, seq), np.int64),
                "position_ids": np.arange(seq, dtype=np.int64)[None]}
        if self.keeps_logits:  # (io binding cannot feed it: onnxruntime's overridable initializers)
            feed["logits_to_keep"] = np.ones(1, np.int64)
        values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in feed.items()}
        out = self.session.run_with_ort_values(["logits", *self.present_names],
                                               {**values, **dict(zip(self.past_names, past, strict=True))})
        self.cache, self.length, self.capacity = out[1:], seq, capacity
        return out[0].numpy()[0, -1]

    def step(self, token: int) -> np.ndarray:
        """Append ``token``; its logits [vocab] (a view valid until the next step)."""
        if self.in_place and self.length >= self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions: prefill with a larger capacity")
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.array([[token]], np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, self.length + 1), np.int64))
        binding.bind_cpu_input("position_ids", np.array([[self.length]], np.int64))
        for name, value in zip(self.past_names, self.cache, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu", 0, np.float32, list(self._logits.shape), self._logits.ctypes.data)
        for name, value in zip(self.present_names, self.cache, strict=True):
            if self.in_place:
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        if not self.in_place:
            self.cache = binding.get_outputs()[1:]
        self.length += 1
        return self._logits[0, -1]
