"""Training stages on the DeepSpeed engine: SwAV pretrain, teacher, student.

`engine.py` wraps DeepSpeed (optimizer groups, schedule, checkpoint/resume), `loop.py` drives it
(optimizer steps over infinite streams, logging, periodic eval, checkpoints), `common.py` holds what
the three stages share (seeds, embedder init, ranking loss, the TensorBoard writer of slade_dist/tb.py),
and `pretrain.py` / `teacher.py` / `student.py` are the stage functions
`run(cfg, run_dir) -> dict` registered in slade_dist.stages. No stage imports another, and nothing
here imports eval/ (the stage runner hands the trainers their periodic evaluator).
Tests: tests/unit/test_engine.py, tests/unit/test_pretrain.py, tests/unit/test_student.py,
tests/integration/test_train_multirank.py, tests/integration/test_resume.py.
"""
