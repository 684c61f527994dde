"""Inference: sampling, batched/streaming generation with a KV cache, chat sessions, tools, retrieval.

Nothing is imported here (importing `tiaoyu_cli.infer.tools` does not load torch's generation code);
import from the modules:

    from tiaoyu_cli.infer.generate import generate, generate_detailed
    from tiaoyu_cli.infer.sampling import SamplingParams
    tokens = generate(model, [prompt_ids], max_new_tokens=64, temperature=0)          # greedy
    res = generate_detailed(model, prompts, 64, SamplingParams(0.8, top_p=0.9), seed=0, logprobs="model")

generate.py owns the loop; steps.py picks the step that runs the model (`Transformer.forward`, the
reference, or an optimisation of it from fast/); slots.py is the serve side's continuous batch.
"""
