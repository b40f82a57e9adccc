"""The PPO engine: maths (``rl.core``), and in later work the Ray actors, driver, config and checkpoints."""
