"""The engine every training run goes through: `run.run_stage` (the one run path) drives `trainer.Trainer`
(the one loop) over a `stage.BaseStage`; options (config), optimizers and schedules (optim), DDP/FSDP
(distributed), the progress line, MFU (flops), the -o folder (outdir), data order (sampler) and metric
sinks (report_to). Nothing here knows a particular objective."""
