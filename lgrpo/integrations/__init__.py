"""Adapters for other RL libraries, one module per library, each imported only when used.

- :mod:`lgrpo.integrations.trl`: ``LGRPOTrainer`` (TRL 1.16's ``GRPOTrainer`` with the fused loss) and
  ``ListenerReward`` (the listener as a TRL reward function); needs ``pip install lgrpo[trl]``.
- :mod:`lgrpo.integrations.verl`: the fused loss for verl 0.9.1's actor on packed hidden states; needs
  ``pip install lgrpo[verl]`` and ``pip install --no-deps verl==0.9.1``.
"""
