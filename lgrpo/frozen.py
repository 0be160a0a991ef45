"""The frozen models of a run: the KL reference and the listener, and whether one module serves both.

In the default run (and the paper's) both are "the same base model, frozen" (SPEC §1): copies of the
policy's starting point, or, after a warm-up, of the warmed-up policy. Held twice, they cost two copies
of the weights for one set of numbers (2 × 16.6 GB for Qwen2.5-VL-7B in bf16). :func:`frozen_layout` is
the one rule, read by the build (:func:`lgrpo.task.build`: what to load and shard), the start-up banner
and the memory plan (:mod:`lgrpo.plan`): the two roles share one module when

- both are loaded (``--loss.beta`` > 0 and ``--reward.w_listener`` > 0),
- their weights come from the same place: the same folder (``--model.reference`` / ``--model.listener``,
  None meaning the policy's), or both the warmed-up policy (each left None with ``--sft.steps`` > 0;
  a folder given beside a warm-up copy is other weights),
- in the same dtype (both are loaded in ``--model.dtype``: :func:`frozen_dtype`),
- and ``--parallel.frozen`` is not ``separate`` (``auto`` shares whenever the above holds; ``shared``
  insists, and is refused where it cannot be).

A LoRA policy (``--model.lora_rank``, :mod:`lgrpo.lora`) holds no frozen copy of its own start: its
adapters-off base *is* those weights (and, after a warm-up, merged, the warmed-up policy), so every role
whose weights come from there is served by the base (``base_roles``), and only a role given other weights
is loaded.

Placement of the shared module: sharded (FSDP2) when both ``--parallel.reference`` and
``--parallel.listener`` say shard, else one full copy per rank. Where the two ask for different things, a
replica serves both: it holds fewer bytes than the two copies they asked for (n against n + n/ranks), the
pass that asked for a replica keeps its forwards free of all-gathers, and the other one loses its
all-gathers too. Either way the numbers are those of two copies: the same weights, the same forwards
(tests/test_frozen.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def frozen_dtype(cfg) -> str:
    """The dtype both frozen models are loaded in: the compute dtype."""
    return cfg.model.dtype


@dataclass(frozen=True)
class FrozenLayout:
    """Which frozen models a run holds. ``roles``: those loaded ("reference", "listener"); ``shared``: one
    module serves both; ``reason``: why (or why not), for the banner; ``base_roles``: those a LoRA
    policy's adapters-off base serves (no module loaded for them)."""

    roles: tuple[str, ...]
    shared: bool
    reason: str
    base_roles: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        """What ``--parallel.frozen auto`` resolves to (and the run's config.json records)."""
        return "shared" if self.shared or len(self.base_roles) == 2 else "separate"

    def placement(self, role: str, cfg, fsdp: bool) -> str:
        """How the module holding ``role`` is placed: "shard" (FSDP2) or "replicate" (without FSDP2 every
        model is whole on each rank). Separate modules go as their option asks; a shared one is sharded
        only when both options ask for it (the module docstring says why)."""
        asked = {"reference": cfg.parallel.reference, "listener": cfg.parallel.listener}
        if not fsdp:
            return "replicate"
        if self.shared:
            return "shard" if asked["reference"] == asked["listener"] == "shard" else "replicate"
        return asked[role]

    def copies(self, cfg, fsdp: bool) -> list[tuple[str, str]]:
        """One ``(name, placement)`` per module held, named by its roles ("reference + listener" when shared)."""
        if self.shared:
            return [(" + ".join(self.roles), self.placement(self.roles[0], cfg, fsdp))]
        return [(role, self.placement(role, cfg, fsdp)) for role in self.roles]

    def describe(self, cfg, fsdp: bool) -> str:
        """The banner's line: what is held, how, and why."""
        base = f"; the LoRA policy with its adapters off serves the {' + '.join(self.base_roles)}" \
            if self.base_roles else ""
        if not self.roles:
            return f"frozen models: none{base}"
        copies = self.copies(cfg, fsdp)
        if len(self.roles) == 1:
            how = "sharded" if copies[0][1] == "shard" else "replicated"
            return f"frozen models: the {copies[0][0]} only ({how}){base}"
        held = ", ".join(f"{name} ({'sharded' if how == 'shard' else 'replicated'})" for name, how in copies)
        count = "one copy" if len(copies) == 1 else "two copies"
        why = self.reason
        if self.shared and fsdp and cfg.parallel.reference != cfg.parallel.listener:
            why += "; replicated: --parallel.reference and --parallel.listener differ, and one replica is " \
                   "smaller than the two copies asked for"
        return f"frozen models: {count}: {held} ({why})"


def frozen_layout(cfg) -> FrozenLayout:
    """The rule of the module docstring for ``cfg`` (a JobConfig). Raises ConfigError for
    ``--parallel.frozen shared`` where the two cannot share."""
    from .config import ConfigError

    given = {"reference": cfg.model.reference, "listener": cfg.model.listener}
    used = tuple(r for r, on in (("reference", cfg.loss.beta > 0), ("listener", cfg.reward.w_listener > 0)) if on)
    # The base is in the frozen dtype by construction (lgrpo.lora holds it in --model.dtype).
    base = tuple(r for r in used if cfg.model.lora_rank and weights_source(cfg, given[r]) == weights_source(cfg, None))
    roles = tuple(r for r in used if r not in base)
    mode = cfg.parallel.frozen
    if len(base) == 2:  # the LoRA base is the one module: nothing to load, nothing to refuse
        return FrozenLayout((), False, "the LoRA policy's base serves both", base)
    if len(roles) < 2:
        why = "only one frozen model is loaded" if roles else "no frozen model is loaded"
        shared = False
    else:
        ref, lst = weights_source(cfg, cfg.model.reference), weights_source(cfg, cfg.model.listener)
        if ref != lst:
            why = f"other weights: the reference is {ref[0]} in {ref[1]}, the listener {lst[0]} in {lst[1]}"
            shared = False
        elif mode == "separate":
            why, shared = "--parallel.frozen separate", False
        else:
            why, shared = f"both {ref[0]} in {ref[1]}", True
    if mode == "shared" and not shared:
        raise ConfigError(f"--parallel.frozen shared: the reference and the listener cannot be one module "
                          f"({why}); use auto (shares whenever they can) or separate")
    return FrozenLayout(roles, shared, why, base)


def weights_source(cfg, given: str | None) -> tuple[str, str]:
    """Where a frozen model's weights come from, and their dtype: equal pairs are the same weights.
    ``given``: its folder option (None: a copy of the policy, warmed-up when there is a warm-up)."""
    if given is None and cfg.sft.steps > 0:
        return "the warmed-up policy", frozen_dtype(cfg)
    return _folder(given or cfg.model.policy or "tiny"), frozen_dtype(cfg)


def _folder(name: str) -> str:
    """A model option as a folder to compare: "tiny" is the built-in folder; a path is resolved (a
    trailing slash, a relative path or a symlink name the same folder). A name that is no folder (the
    memory plan's published shapes) resolves the same way each time, so it compares by name."""
    from .model import TINY, TINY_DIR

    return str((TINY_DIR if name == TINY else Path(name).expanduser()).resolve())
