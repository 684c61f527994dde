"""The objectives: one Stage class per kind of learning (pretrain, sft, classify, reward, dpo, ppo, grpo,
distill), built from rl/ and losses/ and given to the engine's loop. Commands build them in stages/;
several commands share one (sft serves sft, lora, reason and black-box distill; grpo serves rlhf grpo and
reason --rl). An objective imports no other objective, except distill, which runs the chat batches of
SFT's `lm_forward` (tests/test_layers.py)."""
