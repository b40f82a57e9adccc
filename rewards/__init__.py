"""Reward functions: plain Python (no torch, no Ray), verl's ``compute_score`` signature.

Load one by dotted path, ``rewards.causal_loop:compute_score``, verl's ``pkg://`` form or a file path
(``rewards/causal_loop.py:compute_score``); see ``rewards.loading``. Check one before training with
``python -m rewards.check SPEC`` (``rewards/check.py``; its inputs are in ``rewards/cases.py``).
"""
