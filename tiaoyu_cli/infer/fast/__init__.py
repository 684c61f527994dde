"""Fast decode steps: optimisations of `Transformer.forward` (model/transformer.py, the reference), each
tested against it. Only the step factory (infer/steps.py) imports this package; it picks one of these
where it runs the model, and the reference steps everywhere else. tests/test_steps.py runs every step,
fast or reference, through the same prefill / step / select against `Transformer.forward`; beside it:

    weights.py        fused and prepared weights (inference-only, cached per weight version)
                      — tests/test_fast_decode.py (fused weights follow in-place edits and optimizer steps),
                        tests/test_numpy_step.py (prepared weights follow the model)
    torch_step.py     OneTokenStep: one new token per row in torch (LoRA, MoE, autocast, GPUs)
                      — tests/test_fast_decode.py (tokens and log-probs equal `fast_decode=False`, which
                        decodes with `Transformer.forward`), tests/test_open_models.py (scaled RoPE, biases)
                      SlotStep: the same for the serve slots, each row at its own length
                      — tests/test_slots.py (rows joining and leaving equal the full forward pass)
    numpy_step.py     NumpyStep: the whole forward pass in numpy for small fp32 models on CPU
                      — tests/test_numpy_step.py (prefill and step logits, tokens, log-probs),
                        tests/test_slots.py (packed prefill and slot steps)
    kernel.py         the one-row numpy loop compiled from decode_kernel.c
                      — tests/test_numpy_step.py (the "c" cases), tests/test_hardening_tools.py (its cache)
"""
