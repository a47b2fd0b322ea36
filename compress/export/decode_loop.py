"""The generation loop of an exported decoder in onnxruntime: a prompt's prefill, then one token a step with the
KV cache, the way a serving runtime runs it. numpy and onnxruntime only (the session probe runs it without torch).

The cache stays in onnxruntime's values between steps, never copied into numpy arrays. A ``fast`` graph's
attention (``GroupQueryAttention``) appends each step's keys and values to its past buffer in place when the
present output is bound to that same buffer (onnxruntime-genai's ``past_present_share_buffer``): the prefill's
past is a buffer of the whole ``capacity`` (prompt and new tokens), which the prefill's present inherits, and every
decode step then writes one position into it, instead of allocating a cache one position longer and copying the
whole past into it, which holds two caches at once and copies one per step. A ``portable`` graph concatenates past
and new keys: its present is a new tensor every step.

A prompt longer than ``chunk`` tokens is prefilled ``chunk`` tokens a run (chunked prefill, as onnxruntime-genai's
``search.chunk_size``): each run after the first appends its keys to the cache like a decode step, so a prompt's
activations are bounded by the chunk whatever its length, and the logits of the last position only are computed.
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


def exported_chunk(meta: dict) -> int:
    """Prompt tokens a prefill run takes, as ``export.json`` (``meta``) records it; 0 (the whole prompt) for exports
    from before it was recorded."""
    return int(meta.get("prefill_chunk") or 0)


def cache_in_place(weights: str | None) -> bool:
    """Whether an export of ``weights`` ("fast": ``GroupQueryAttention``) can write its present into its past."""
    return weights == "fast"


class DecodeLoop:
    """Batch-1 greedy-style stepping over ``session`` (an ``onnxruntime.InferenceSession`` of an export whose
    ``export.json`` io block is ``io``); ``in_place``: the graph's attention writes its present into its past
    buffer (``weights: fast``); ``chunk``: prompt tokens a prefill run takes (0: the whole prompt at once)."""

    def __init__(self, session, io: dict, in_place: bool, chunk: int = 0):
        self.session, self.in_place, self.chunk = session, in_place, int(chunk)
        self.kv_heads, self.head_dim, self.vocab = int(io["kv_heads"]), int(io["head_dim"]), int(io["vocab_size"])
        self.past_names, self.present_names = cache_names(int(io["layers"]))
        self.keeps_logits = takes_logits_to_keep(session)
        self.cache: list = []
        self.length = self.capacity = 0
        self._run_options: object = None  # both made on the first in-place run (_run_into_cache)
        self._fetch_devices: list | None = None

    def prefill(self, prompt: list[int], capacity: int) -> np.ndarray:
        """Run ``prompt`` from an empty cache, ``chunk`` tokens a run; the last position's logits [vocab].
        ``capacity``: the most positions the cache will hold (prompt and every token to come)."""
        import onnxruntime as ort

        seq = len(prompt)
        if seq == 0:
            raise ValueError("an empty prompt: nothing to continue from")
        if capacity < seq:
            raise ValueError(f"a cache of {capacity} positions cannot hold a {seq}-token prompt")
        step = self.chunk if self.chunk > 0 else seq
        first = min(seq, step)
        # the past is read only up to the positions the mask counts (none here): in place, its buffer is left
        # unwritten (no pages touched) and becomes the present the later runs write into
        past_length = capacity if self.in_place else 0
        past = [ort.OrtValue.ortvalue_from_shape_and_type([1, self.kv_heads, past_length, self.head_dim], np.float32)
                for _ in self.past_names]
        feed = self._feed(prompt[:first], 0)
        values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in feed.items()}
        out = self.session.run_with_ort_values(["logits", *self.present_names],
                                               {**values, **dict(zip(self.past_names, past, strict=True))})
        self.cache, self.length, self.capacity = out[1:], first, capacity
        logits = out[0].numpy()[0, -1]
        for start in range(first, seq, step):
            logits = self._advance(prompt[start:start + step])
        return logits

    def step(self, token: int) -> np.ndarray:
        """Append ``token``; its logits [vocab]."""
        return self._advance([token])

    def _feed(self, tokens: list[int], past: int) -> dict:
        n = len(tokens)
        feed = {"input_ids": np.array([tokens], np.int64), "attention_mask": np.ones((1, past + n), np.int64),
                "position_ids": np.arange(past, past + n, dtype=np.int64)[None]}
        if self.keeps_logits:
            feed["logits_to_keep"] = np.ones(1, np.int64)
        return feed

    def _advance(self, tokens: list[int]) -> np.ndarray:
        """Append ``tokens`` after the cache; the last one's logits [vocab]."""
        import onnxruntime as ort

        if self.in_place and self.length + len(tokens) > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions: prefill with a larger capacity")
        feed = self._feed(tokens, self.length)
        if self.in_place:
            logits = self._run_into_cache(feed, len(tokens) if not self.keeps_logits else 1)
        else:
            values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in feed.items()}
            out = self.session.run_with_ort_values(["logits", *self.present_names],
                                                   {**values, **dict(zip(self.past_names, self.cache, strict=True))})
            logits, self.cache = out[0].numpy(), out[1:]
        self.length += len(tokens)
        return logits[0, -1]

    def _run_into_cache(self, feed: dict, positions: int) -> np.ndarray:
        """Run with every present output written into its past buffer and the logits into a new array
        ``[1, positions, vocab]``. onnxruntime's public IO binding cannot feed an overridable initializer
        (``logits_to_keep``), so this takes the session's own run over value vectors, whose outputs given
        before the run are written in place."""
        import onnxruntime as ort
        from onnxruntime.capi import _pybind_state as C

        logits = np.empty((1, positions, self.vocab), np.float32)
        inputs = [ort.OrtValue.ortvalue_from_numpy(value) for value in feed.values()]  # kept alive for the run
        feeds, fetches = C.OrtValueVector(), C.OrtValueVector()
        for value in (*inputs, *self.cache):
            feeds.push_back(value._ortvalue)
        for value in (ort.OrtValue.ortvalue_from_numpy(logits), *self.cache):
            fetches.push_back(value._ortvalue)
        if self._fetch_devices is None:
            cpu = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
            self._run_options, self._fetch_devices = ort.RunOptions(), [cpu] * (1 + len(self.cache))
        self.session._sess.run_with_ortvaluevector(self._run_options, [*feed, *self.past_names], feeds,
                                                   ["logits", *self.present_names], fetches, self._fetch_devices)
        return logits
