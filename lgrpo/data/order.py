"""The order prompts are drawn in: the same on any number of ranks, resumable from two integers."""

from __future__ import annotations

import torch


class PromptOrder:
    """Global prompt order: a seeded permutation per epoch, consumed ``per_step`` prompts at a time.

    The order depends only on (seed, epoch), never on the number of ranks; the state is two ints.
    ``swap`` flags (image-position augmentation) are a seeded function of (seed, epoch, index), or
    all False with ``swap=False``.
    """

    def __init__(self, n: int, per_step: int, seed: int, swap: bool = True):
        if n < 1:
            raise ValueError("the training split holds no prompts")
        self.n, self.per_step, self.seed, self.swap = n, per_step, seed, swap
        self.epoch, self.offset = 0, 0

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> tuple[list[int], list[bool]]:
        idx, swaps = [], []
        while len(idx) < self.per_step:
            perm = self._perm(self.epoch)
            take = min(self.per_step - len(idx), self.n - self.offset)
            chunk = perm[self.offset : self.offset + take].tolist()
            g = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch + 1)
            flips = torch.rand(self.n, generator=g) < 0.5
            idx += chunk
            swaps += [bool(flips[i]) and self.swap for i in chunk]
            self.offset += take
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return idx, swaps

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n", self.n) != self.n:
            raise ValueError(
                f"the checkpoint's data order was over {state['n']} prompts, the data now holds "
                f"{self.n}: resume with the same data (a bad row need not be removed: with --data.on_bad_row "
                f"skip it keeps its place, is replaced when drawn and listed in bad_rows.jsonl)"
            )
        self.epoch, self.offset = state["epoch"], state["offset"]
