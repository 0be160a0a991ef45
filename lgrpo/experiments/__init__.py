"""Experiments that run the method end to end and report what it does (``python -m lgrpo.experiments.NAME``).

- :mod:`lgrpo.experiments.listener`: the paper's claim at small scale: GRPO with and without the listener
  reward on a task where reasoning and answer can disagree (:mod:`lgrpo.experiments.shortcut`).
"""
