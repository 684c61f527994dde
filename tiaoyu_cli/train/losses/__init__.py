"""Losses as pure functions of tensors, the formula in each docstring, each tested against numbers worked
by hand: lm (next-token cross-entropy), rl (reward model, DPO, PPO, GRPO), kd (distillation), classify."""
