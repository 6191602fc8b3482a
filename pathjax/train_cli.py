"""`pathjax train --config=configs/X.py:VARIANT --workdir DIR [--config.a.b=v ...]`.

Rerunning the same command continues from the newest good checkpoint in DIR. The config is
loaded and every override checked before jax starts anything, so a typo fails at once.

Multi-process: pass `--coordinator_address host:port --num_processes N --process_id i`
(CPU processes then use gloo collectives), or `--distributed` to let
`jax.distributed.initialize()` detect a TPU pod or SLURM cluster; the launchers in launch/
set the same through the environment (pathjax.distributed).

Exit codes: 0 finished; 2 a user error (config, workdir in use or not writable, a checkpoint
written for another config), nothing trained; 74 a checkpoint could not be saved (disk full,
permissions): training stopped at that step, rerun to resume from the last saved one;
75 preempted (SIGTERM): the state was saved, rerun the same command to continue.
"""

from __future__ import annotations

import json
import sys

EXIT_SAVE_FAILED = 74  # EX_IOERR
EXIT_PREEMPTED = 75    # EX_TEMPFAIL: "try again later", what schedulers requeue on


def register(parser):
  parser.add_argument("--config", required=True, help="configs/<name>.py[:variant]")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tb/, config.json")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() with cluster auto-detection")
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)


def init_distributed(args) -> None:
  from pathjax import distributed
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                         auto=args.distributed)


def main(args) -> int:
  from pathjax.config_lib import load_config
  from pathjax.train_config import check_train_config
  config = load_config(args.config, args.config_overrides)  # ConfigError -> exit 2, nothing ran
  check_train_config(config)
  init_distributed(args)
  from pathjax.checkpoint import CheckpointSaveError
  from pathjax.models.model_dir import ModelDirError
  from pathjax.train import train
  try:
    final = train(config, args.workdir)
  except CheckpointSaveError as e:
    print(f"pathjax train: error: {e}", file=sys.stderr)
    return EXIT_SAVE_FAILED
  except ModelDirError as e:  # config.export_model into a path holding something else
    print(f"pathjax train: error: export: {e}", file=sys.stderr)
    return 2
  import jax
  if jax.process_index() == 0:
    print("final metrics: " + json.dumps(final, sort_keys=True))
  return EXIT_PREEMPTED if final.get("preempted_at") else 0
