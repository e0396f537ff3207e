"""Entry point: ``python -m atpo_jax.launch --config=configs/search_qa.py[:variant] [--workdir=DIR]``.

Config overrides use ml_collections syntax, e.g. ``--config.rollout.beam_size=4``. A run owns its
workdir (a lock; ``run.json`` records its settings): a fresh run refuses a workdir that holds
another run; ``--resume`` continues it from the newest complete checkpoint that verifies
(refusing settings that change the run unless ``--resume_allow_changes`` names them);
``--overwrite`` moves it to ``<workdir>/archive/`` and starts afresh (docs/training.md).

Multi-process runs (docs/scale_out.md): start the same command once per process. On TPU pods,
SLURM and Open MPI ``jax.distributed`` finds its peers by itself; elsewhere pass
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). Without any of these the
run is single-process.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from atpo_jax import parallel
from atpo_jax.builder import build_run, default_workdir
from atpo_jax.cli import fail, parse_flags, quiet_closed_event_loop
from atpo_jax.config import run_settings
from atpo_jax.settings import ConfigError
from atpo_jax.train.checkpointing import CheckpointError
from atpo_jax.train.evaluation import markdown_table
from atpo_jax.train.optimizer import NonFiniteError
from atpo_jax.train.trainer import Trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/search_qa.py", "Path to an ml_collections config file[:variant]."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<variant>).")
_RESUME = flags.DEFINE_bool(
    "resume", False, "Continue the workdir's run from its newest checkpoint that verifies."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Start afresh in a workdir that holds a run, moving that run to <workdir>/archive/<time>/.",
)
_ALLOW_CHANGES = flags.DEFINE_list(
    "resume_allow_changes",
    [],
    "With --resume: settings (section.field or section.*) allowed to differ from the saved run's.",
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "jax.distributed: auto = when a coordinator/process count is given or a multi-process "
    "SLURM, Open MPI or TPU-pod job is detected; on = always (JAX detects the cluster); off.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (env JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (env JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank (env JAX_PROCESS_ID).")
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    "local_device_ids",
    None,
    "Comma-separated local devices of this process (env JAX_LOCAL_DEVICE_IDS).",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # Library INFO chatter (orbax, XLA backends) at WARNING; our own progress messages at INFO.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("atpo_jax").setLevel(logging.INFO)
    quiet_closed_event_loop()  # a damaged checkpoint's failed read leaves orbax noise behind
    try:
        settings = run_settings(_CONFIG.value)
    except ConfigError as e:
        fail("configuration error", e)
    workdir = _WORKDIR.value or default_workdir(settings)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        fail("configuration error", f"cannot create --workdir={workdir}: {e.strerror or e}")
    try:
        parallel.initialize(
            {
                "mode": _DISTRIBUTED.value,
                "coordinator_address": _COORDINATOR.value,
                "num_processes": _NUM_PROCESSES.value,
                "process_id": _PROCESS_ID.value,
                "local_device_ids": _LOCAL_DEVICE_IDS.value,
            }
        )
    except ValueError as e:
        fail("distributed setup error", e)
    try:
        trainer = Trainer(build_run(settings, workdir))
        results = trainer.train(
            resume=_RESUME.value,
            overwrite=_OVERWRITE.value,
            allow_changes=tuple(_ALLOW_CHANGES.value),
        )
    except ConfigError as e:
        fail("configuration error", e)
    except CheckpointError as e:
        fail("checkpoint error", e)
    except NonFiniteError as e:
        fail("training stopped", e, code=1, immediate=False)
    if results and parallel.is_main_process():
        print(f"\nHeld-out evaluation after {trainer.step} steps (workdir {workdir}):")
        print(markdown_table(results))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
