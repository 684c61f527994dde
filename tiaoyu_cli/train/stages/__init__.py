"""One module per training command: read the inputs and the models, build the objective, hand a Plan to
`engine.run.run_stage`. No stage imports another (tests/test_layers.py)."""
