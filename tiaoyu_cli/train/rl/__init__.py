"""What the preference and RL objectives share: loading the policy, its reference and a reward model
(models), prompts and held-out splits (prompts), rollouts laid out for training (layout), LoRA as its own
reference (lora), the stage base for preference pairs (pairs) and for sampled answers (rollout, with its
rewards), agentic rollouts (tool_rollout) and the answer checker (answers)."""
