"""Training: one run path, one loop, an objective per kind of learning, a thin run per command.

    train/
      engine/      the loop and what surrounds it: run.py (Plan, run_stage: checks, lock, seeding, DDP
                   launch, interrupts), trainer.py (Trainer: accumulation, clipping, schedule, logging,
                   checkpoints, exact resume), stage.py (BaseStage, StepOutput, FullModelSaver), config,
                   optim, distributed, progress, flops, outdir, sampler (EpochSampler, WindowSampler),
                   report_to
      losses/      pure functions, the formula in each docstring: lm (cross-entropy, fused with the head),
                   rl (reward model, DPO, PPO, GRPO), kd (distillation), classify
      rl/          what the preference and RL objectives share: models (policy, reference, reward model),
                   prompts, layout (Rollout, response_logps), lora (LoraCheckpoint), pairs (PairStage),
                   rollout (RolloutStage, rewards), tool_rollout, answers (the answer checker)
      objectives/  the Stage classes several commands build on, one module each: pretrain, sft, classify,
                   reward, dpo, ppo, grpo (+ ToolUse), distill
      stages/      one module per command: read the data and the models, build the objective, call
                   run_stage — pretrain, finetune (sft, lora, --task classify), reward, dpo, ppo, grpo,
                   distill (the run + teacher_data), reason

Imports look down only, engine < losses < rl < objectives < stages, and no stage imports another
(tests/test_layers.py). The one path a training run takes:

    cli/<command>.py → stages.<X>.run_<X>(options, TrainConfig)
        prepare_<X>():  data + models → an objective (objectives/, built on rl/ and losses/) → Plan
    → engine.run.run_stage(name, train, prepare) → engine.trainer.Trainer(model, stage).fit()
        every step: stage.next_batch() → stage.step(model, batch) → StepOutput(loss, metrics)
"""
