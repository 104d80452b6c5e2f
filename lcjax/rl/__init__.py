"""Reinforcement learning: DORA-style asynchronous rollouts with bounded staleness and GRPO.

`python -m lcjax.rl` (see __main__.py). Pieces: objective.py (the GRPO loss), versions.py (the
policy-version window), rollout.py (serve engines, one policy version per trajectory),
learner.py (the jitted update), loop.py (async / sync controller), envs/ (verifiable rewards),
checkpoint.py (orbax save / resume), plot.py (reward curve PNG).
"""
