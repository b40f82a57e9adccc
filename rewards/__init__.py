"""Reward functions: plain Python (no torch, no Ray), verl's ``compute_score`` signature.

Load one by dotted path, ``rewards.causal_loop:compute_score``; see ``rewards.loading``.
"""
