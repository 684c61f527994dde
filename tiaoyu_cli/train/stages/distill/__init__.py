"""`tiaoyu distill`: the run (run.py) and the teacher's answers for black-box distillation (teacher_data.py)."""
