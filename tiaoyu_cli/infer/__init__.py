"""Inference: sampling, batched/streaming generation with a KV cache, chat sessions.

    from tiaoyu_cli.infer import generate, generate_detailed, SamplingParams
    tokens = generate(model, [prompt_ids], max_new_tokens=64, temperature=0)          # greedy
    res = generate_detailed(model, prompts, 64, SamplingParams(0.8, top_p=0.9), seed=0, logprobs="model")
"""

from tiaoyu_cli.infer.generate import (DEFAULT_STOP_IDS, GenerationResult, IncrementalDecoder, Piece,
                                       decode_response, generate, generate_detailed, stream)
from tiaoyu_cli.infer.sampling import SamplingParams, sample_next
from tiaoyu_cli.infer.session import ChatModel, ChatSession, GenerationOptions, answer_records, load_chat_model

__all__ = ["generate", "generate_detailed", "stream", "GenerationResult", "SamplingParams", "sample_next",
           "IncrementalDecoder", "Piece", "decode_response", "DEFAULT_STOP_IDS", "ChatModel", "ChatSession",
           "GenerationOptions", "answer_records", "load_chat_model"]
