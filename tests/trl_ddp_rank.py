"""A rank of ``test_integration_trl.py::test_ddp_two_ranks``: TRL's own training loop under torchrun.

``torchrun --nproc_per_node 2 tests/trl_ddp_rank.py OUT MODEL_DIR``: accelerate reads torchrun's
environment and, with ``use_cpu=True``, wraps the policy in DDP over gloo. Each rank trains once per
entry of ``RUNS`` from the same model folder and seed, and saves ``OUT/<run>.rank<r>.pt``: its final
weights, its step logs and, for LGRPOTrainer, the group index of each micro-batch's rows (None where the
update ran every row's prompt) and of each old/reference log-prob pass's rows (beta > 0 and
num_iterations=2: TRL runs both on the generation batch).

The ranks' work is uneven by construction: with ``shuffle_dataset=False`` TRL's sampler hands rank 0 the
first half of each generation batch (4 prompts x 2 completions), one prompt text four times over, and
rank 1 the second half, four texts of different lengths (left padding): rank 0's micro-batches of 4 rows
hold one distinct prompt, rank 1's two to four.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from test_integration_trl import PROMPTS, config, diversity

DATA = ["a red circle"] * 4 + PROMPTS
# dapo divides by TRL's global token count over num_processes: the normaliser that sees the ranks. Two
# optimizer steps of two micro-batches each (the first under DDP's no_sync, the second all-reducing); the
# second step reuses the first's rollouts (num_iterations=2), so ratios are away from 1 and clipping is on.
# SGD: the weights move linearly in the gradients, so comparing weights compares gradients (Adam's
# g / sqrt(v) turns a rounding-sized gradient into a learning-rate-sized step). TRL's default activation
# checkpointing leaves DDP's find_unused_parameters off: a parameter unused on one rank fails the step.
OPTIONS = dict(per_device_train_batch_size=4, num_generations=2, gradient_accumulation_steps=2, num_iterations=2,
               shuffle_dataset=False, loss_type="dapo", beta=0.1, epsilon=0.05, max_steps=2, optim="sgd",
               learning_rate=1.0, gradient_checkpointing=True)
# trl: TRL's GRPOTrainer; repeated: LGRPOTrainer(shared_prefix=False); shared: LGRPOTrainer; mixed: shared,
# but on each micro-step one rank falls back to every row's prompt (rank 1 on the first micro-batch of a
# step, rank 0 on the second), as a data-dependent fallback would.
RUNS = ("trl", "repeated", "shared", "mixed")


def train(run: str, model_dir: str, out: Path) -> dict:
    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from datasets import Dataset
    from torch.nn.parallel import DistributedDataParallel
    from toy_task import char_tokenizer
    from trl import GRPOTrainer

    from lgrpo.integrations.trl import LGRPOTrainer

    rank = int(os.environ["RANK"])

    class Recording(LGRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.groups, self.passes, self.updating = [], [], False

        def _compute_loss(self, model, inputs):
            self.updating = True
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self.updating = False

        def _shared_batch(self, inputs):
            if not self.updating:  # the no-gradient log-prob passes: no collective to keep in step
                batch = super()._shared_batch(inputs)
                self.passes.append(None if batch is None else batch.group.tolist())
                return batch
            if run == "mixed" and len(self.groups) % 2 != rank:
                batch = None
            else:
                batch = super()._shared_batch(inputs)
            self.groups.append(None if batch is None else batch.group.tolist())
            return batch

    cls = GRPOTrainer if run == "trl" else Recording
    kwargs = dict(shared_prefix=False) if run == "repeated" else {}
    trainer = cls(model=model_dir, reward_funcs=diversity, args=config(out / run, **OPTIONS),
                  train_dataset=Dataset.from_dict({"prompt": DATA}), processing_class=char_tokenizer(), **kwargs)
    trainer.train()
    ddp = trainer.model_wrapped
    assert trainer.accelerator.distributed_type == DistributedType.MULTI_CPU, trainer.accelerator.distributed_type
    assert dist.get_backend() == "gloo" and dist.get_world_size() == 2
    assert isinstance(ddp, DistributedDataParallel) and not ddp.find_unused_parameters
    return {"weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "logs": [h for h in trainer.state.log_history if "grad_norm" in h],
            "groups": getattr(trainer, "groups", None), "passes": getattr(trainer, "passes", None)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, model_dir = Path(sys.argv[1]), sys.argv[2]
    for run in RUNS:
        result = train(run, model_dir, out)
        torch.save(result, out / f"{run}.rank{os.environ['RANK']}.pt")
