"""The PPO engine. The maths is pure (``rl.core``); Ray appears only in ``rl.actors`` and ``rl.driver``.

core.py (PPO maths) · rollout.py (torch rollout backend) · trainer.py (PPO update) · shared_prompt.py (the
trainer's forward, each prompt once) · reward_scorer.py · actors.py (Ray) · driver.py (the loop) ·
heldout.py (held-out evaluation) · evaluate.py (the evaluation command) · config.py · checkpoint.py ·
tracking.py · sft.py (warm start) · report.py · plot.py · prompts.py · compare.py
"""
