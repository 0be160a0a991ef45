"""``python -m lgrpo.train``: parse the config → build → train → close.

No arguments: the tiny built-in Qwen2.5-VL on the synthetic colour/shape task — a supervised warm-up
on templated reasoning (the format, the image descriptions and the verdict), then GRPO with the
listener reward; held-out accuracy and contradiction rate at the start, after the warm-up and after
GRPO; checkpoints, metrics and the exported policy under ``runs/``.

``torchrun --nproc_per_node N -m lgrpo.train ...`` runs the same program on N ranks (FSDP2).
The task is built by :mod:`lgrpo.task`; start-up, warm-up and held-out evaluations are :mod:`lgrpo.run`.
"""

from __future__ import annotations

import sys
import time

from . import distributed as D
from . import preflight
from .checkpoint import CheckpointError
from .config import ConfigError, parse_args
from .data import DataError
from .metrics import MetricsWriteError
from .plan import show_plan, split_plan_args
from .run import HeldOut, finish, frozen_copies, start_run, warm_up_or_restore, write_run_config
from .seeding import seed_everything
from .task import build
from .trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    try:
        plan, argv = split_plan_args(sys.argv[1:] if argv is None else list(argv))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cfg = parse_args(argv)
    if plan is not None:  # the memory plan: read config.json on the meta device, print, stop
        try:
            return show_plan(cfg, plan)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"--plan: {err}") from None
    dist = D.init(cfg.train.device, cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s)
    cfg.validate_world(dist.world_size)
    run_dir, changes = start_run(cfg, dist)  # checks and the lock; nothing written to the folder yet
    seed_everything(cfg.train.seed + dist.rank)
    t0 = time.perf_counter()
    task, models, listener = build(cfg, dist)
    preflight.check_task(cfg, task, models.policy, run_dir, dist)
    trainer = Trainer(cfg, dist, task, models, run_dir)
    write_run_config(cfg, run_dir, changes, dist)  # the run can start: its config is the folder's now

    held_out = HeldOut(cfg, dist, trainer, run_dir)
    reports = warm_up_or_restore(cfg, dist, trainer, frozen_copies(cfg, models, listener), run_dir, held_out)
    trainer.fit(on_step=held_out.periodic)
    if trainer.stopped_by is not None:  # preempted or Ctrl-C: the checkpoint is saved, nothing else to do
        D.close()
        return 128 + trainer.stopped_by
    reports["after"] = held_out("held-out, after GRPO")
    finish(cfg, dist, trainer, run_dir, reports, t0)
    D.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C outside the GRPO loop (or a second one inside it): no traceback
        print("\n[stop] interrupted: nothing saved since the last checkpoint", file=sys.stderr, flush=True)
        sys.exit(130)
    except (ConfigError, DataError, CheckpointError, MetricsWriteError) as err:  # the message says what to do
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(err, ConfigError) else 1)
