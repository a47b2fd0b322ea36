"""``genai_config.json``: what onnxruntime-genai's ``Model(folder)`` reads to run an ONNX export (its generator
loop, KV cache and tokenizer) without our code.

The decoder graph (``llama.py``) already has the names and layouts onnxruntime-genai expects of a decoder-only
model: ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` in, ``logits`` and
``present.{i}.key|value`` out, the cache ``[batch, kv_heads, past, head_dim]`` in float32. A ``fast`` graph's
attention (``GroupQueryAttention``) reads and writes one cache buffer in place (``past_present_share_buffer``
true: onnxruntime-genai allocates it for the generator's ``max_length`` and each step appends one position instead
of copying the whole cache into a new tensor); a ``portable`` graph concatenates past and new keys, so its past
and present stay separate tensors. ``search.chunk_size`` prefills a prompt that many tokens a run (chunked
prefill): a prompt's activations and its ``[1, chunk, vocab]`` logits buffer stay bounded by the chunk.
"""

from __future__ import annotations

GENAI_CONFIG = "genai_config.json"
GENAI_ONNX = "genai.onnx"  # the decoder graph it names: the head reads the last token only (head_positions.py)
PREFILL_CHUNK = 128  # prompt tokens a prefill run takes by default: export.json's, search.chunk_size and our loop's


def _ids(value) -> int | list[int] | None:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] if len(value) != 1 else int(value[0])
    return None if value is None else int(value)


def genai_config(config, generation_config, io: dict, onnx_file: str, custom_ops_library: str | None = None,
                 cache_in_place: bool = False, prefill_chunk: int = 0) -> dict:
    """The ``genai_config.json`` of an export of a model with ``config`` (transformers) and ``io`` (export.json's);
    ``custom_ops_library``: the file name of the operator library the folder ships (``compress.ortops``);
    ``cache_in_place``: the graph's attention appends to its past buffer (``GroupQueryAttention``);
    ``prefill_chunk``: prompt tokens a prefill run takes (0: the whole prompt)."""
    gen = generation_config
    eos = _ids(getattr(gen, "eos_token_id", None) if gen is not None else None) or _ids(config.eos_token_id)
    bos = _ids(getattr(gen, "bos_token_id", None) if gen is not None else None) or _ids(config.bos_token_id)
    pad = getattr(config, "pad_token_id", None)
    pad = _ids(pad) if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    context = int(getattr(config, "max_position_embeddings", 2048))
    # 0: onnxruntime's own default, a thread per core (left out, onnxruntime-genai runs on one)
    session_options: dict = {"log_id": "onnxruntime-genai", "provider_options": [], "intra_op_num_threads": 0}
    if custom_ops_library:
        session_options["custom_ops_library"] = custom_ops_library
    # a token id the model does not have is left out (onnxruntime-genai reads null as a malformed file)
    ids = {key: value for key, value in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad))
           if value is not None}
    return {
        "model": {
            "type": config.model_type,
            **ids,
            "vocab_size": int(io["vocab_size"]),
            "context_length": context,
            "decoder": {
                "session_options": session_options,
                "filename": onnx_file,
                "head_size": int(io["head_dim"]),
                "hidden_size": int(config.hidden_size),
                "num_attention_heads": int(io["heads"]),
                "num_key_value_heads": int(io["kv_heads"]),
                "num_hidden_layers": int(io["layers"]),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {  # greedy by default, as `compress generate`; callers set their own options
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "top_k": 1, "top_p": 1.0,
            "temperature": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0, "min_length": 0, "max_length": context, "early_stopping": True,
            "past_present_share_buffer": cache_in_place,
            **({"chunk_size": prefill_chunk} if prefill_chunk > 0 else {}),
        },
    }
