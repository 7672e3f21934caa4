"""The launcher: slade_dist stages as Slurm jobs through submitit, or as local / in-process runs.

Owns everything between the command line users run (`python launch/submit.py --stage STAGE --config
FILE [k=v ...]`, or `python -m slade_dist.launch ...`) and the stage functions: turning a stage (or
`all`: pretrain -> teacher -> R x (embed -> cluster -> student) -> eval) into jobs, each with its
own node/GPU shape, linked by `afterok` dependencies; every check that can be done before
submitting anything; `--dry-run`; `--cluster local|debug`; `--status` / `--cancel`; and what runs
inside each task. It is the only part of slade_dist that imports submitit, and it never builds a
model.

  plan.py    JobSpec, job shapes and names, the chain of jobs, dropping finished stages, shard lists
  checks.py  checks before submitting: flag ranges, flags per stage, stage modules, inputs, --shards,
             launch.sbatch_extra
  slurm.py   sinfo partition sizes, shapes that fit, #SBATCH parameters and the dry run's script
             lines, submitting to Slurm
  local.py   --cluster local / debug: the jobs one after the other on this machine, logs streamed
  status.py  <run>/logs/submitted.json (every launch), --status, --cancel (submitit's job objects)
  job.py     StageJob, the callable each task runs (the only launch module that imports torch)
  cli.py     argparse, which config file, resolving, dry run, main()

Nothing is imported here, so a task unpickling StageJob loads only what it needs.
Tests: tests/unit/test_launch.py, tests/integration/test_launch_local.py,
tests/integration/test_slurm.py.
"""
