"""One module per training command: read the inputs and the models, build the objective, hand a Plan to
`engine.run.run_stage`. No stage imports another (tests/test_layers.py).

Every stage module has the same two public names: `Config`, one dataclass holding everything the command takes
besides the loop's TrainConfig (the inputs as fields with their help in `metadata`, the objective's config
nested as one field, e.g. `grpo.Config.grpo: GRPOConfig`, the tool options where the stage has them), and
`run(cfg, train, log=print) -> dict`. A caller names the stage by its module (`grpo.Config`, `grpo.run`):
the same names in every module let one table drive every stage, and the stage's `Config` cannot be mistaken
for the objective's `GRPOConfig` (the hyper-parameters recorded in trainer.json). The command's flags are
generated from `Config` (cli/common.py `config_options`), so they are declared once. (distill is a package —
its run and the teacher's answer file — whose `run.py` holds its `Config` and `run`.)
"""
