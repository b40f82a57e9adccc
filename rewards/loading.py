"""Load a reward function by the name a config gives it, in every form verl accepts for its path.

    load_reward_fn("rewards.causal_loop:compute_score")           # a module on sys.path
    load_reward_fn("pkg://rewards.causal_loop:compute_score")     # verl's package form (also pkg://rewards/causal_loop)
    load_reward_fn("my_rewards/arith.py:compute_score")           # a file, as verl's custom_reward_function.path
    load_reward_fn("file://my_rewards/arith.py:compute_score")

A file is loaded exactly as verl loads ``reward.custom_reward_function.path``: ``spec_from_file_location`` +
``exec_module``, without an entry in ``sys.modules``, so a reward that works here works there. The function
must take verl's ``(data_source, solution_str, ground_truth, extra_info=None)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REQUIRED_PARAMETERS = ("data_source", "solution_str", "ground_truth")
PKG_PREFIX, FILE_PREFIX = "pkg://", "file://"


def load_file_module(path: Path, spec: str) -> ModuleType:
    """Execute a ``.py`` file as a module the way verl does: a fresh module object, never in sys.modules."""
    if not path.is_file():
        raise ValueError(f"reward function {spec!r}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"custom_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file failed at import; say so, keep the cause chained
        hint = (" (a module-level @dataclass under `from __future__ import annotations` needs sys.modules, which "
                "verl's file loading leaves empty: drop the __future__ import)") if "__dict__" in str(e) else ""
        raise ValueError(f"reward function {spec!r}: running {path} raised {type(e).__name__}: {e}{hint}") from e
    return module


def _load_module(name: str, spec: str) -> ModuleType:
    if name.startswith(FILE_PREFIX) or name.endswith(".py"):
        return load_file_module(Path(name.removeprefix(FILE_PREFIX)), spec)
    dotted = name.removeprefix(PKG_PREFIX).replace("/", ".")  # verl's pkg:// takes dots or slashes
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as e:
        raise ValueError(f"reward function {spec!r}: cannot import module {dotted!r} ({e})") from e


def load_reward_fn(spec: str) -> Callable:
    """``"package.module:function"``, ``"pkg://package.module:function"`` or ``"path/file.py:function"``
    -> the function, checked to take verl's arguments."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not attr or module_name in ("", "pkg", "file"):  # "pkg://x" alone splits at its own colon
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
