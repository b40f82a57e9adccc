"""Load a reward function by dotted path, as the trainer's config names it.

    load_reward_fn("rewards.causal_loop:compute_score")
    load_reward_fn("my_rewards/arith.py:compute_score")     # a file, as verl's custom_reward_function.path

The function must take verl's ``(data_source, solution_str, ground_truth, extra_info=None)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path

REQUIRED_PARAMETERS = ("data_source", "solution_str", "ground_truth")


def _load_module(name: str, spec: str):
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"custom_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ValueError(f"reward function {spec!r}: cannot import module {name!r} ({e})") from e


def load_reward_fn(spec: str) -> Callable:
    """``"package.module:function"`` or ``"path/file.py:function"`` -> the function, checked."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r}: write it as 'package.module:function' or 'file.py:function'")
    module = _load_module(module_name, spec)
    fn = getattr(module, attr, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"reward function {spec!r}: {module_name} has no function {attr!r}; it has {names}")
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_POSITIONAL for p in params.values())
    if not takes_any and len(params) < len(REQUIRED_PARAMETERS):
        raise ValueError(f"reward function {spec!r} takes {list(params)}; it must take "
                         "(data_source, solution_str, ground_truth, extra_info=None)")
    return fn
