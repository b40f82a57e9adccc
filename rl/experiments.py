"""The study's experiment list (``rl/presets/experiments.yaml``): loaded, validated, resolved to the exact config
and model the driver trains, and described (parameters, cache and FLOPs per token, the LRU's settings).

    from rl.experiments import describe_all, load_experiments
    experiments = load_experiments()          # ValueError naming the experiment and the field on bad input
    rows = describe_all(experiments)          # what ``scripts/run_ablation.py --dry-run`` prints

An experiment is ``{description, group, overrides: [section.field=value, ...]}`` with optional ``base`` (the
preset, default the file's ``base``; ``load_experiments(base=...)`` replaces it for all), ``extends`` (another
experiment whose group, base and overrides come first), ``requires_group`` / ``requires_option`` (a group of
``models.presets.GROUPS`` or a config field ``section.field`` that does not exist yet: the experiment is kept,
marked unavailable with the reason, and runs once the code has it), ``retrofit_from`` (a ``baseline``
experiment of the file: each run starts from that experiment's step-0 checkpoint at the same seed, its
warm-started Qwen2, converted for this experiment's MLA group by the driver, or taken as it is by a
``baseline`` group -- the arm's control, the same recovery steps without a conversion;
``scripts/run_ablation.py`` sets ``model.path`` per seed, ``step0_policy``).

Overrides apply as on the driver's command line, except that a dict-valued field (``model.overrides``,
``data.task``) is merged into the preset's dict: an experiment names only what it changes. Each experiment's
overrides are resolved to one ``section.field=value`` per field, which the driver then applies as given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

import models
from models import convert, param_count
from rl.config import SECTIONS, ExperimentConfig, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = ROOT / "rl" / "presets" / "experiments.yaml"
DEFAULT_BASE = "rl/presets/tiny.yaml"
FILE_KEYS = ("base", "experiments")
ENTRY_KEYS = ("description", "group", "overrides", "base", "extends", "requires_group", "requires_option",
              "retrofit_from")
INHERITED = ("group", "base", "requires_group", "requires_option", "retrofit_from")  # what extends passes on
RUN_FIELDS = ("logging.run_dir", "trainer.seed", "data.seed")  # set for each run by scripts/run_ablation.py
# What a retrofit experiment's group may be: an MLA group the checkpoint is converted to, or the baseline itself
# (the checkpoint continued as it is: the same recovery steps with no conversion, the arm's control).
RETROFIT_GROUPS = ("baseline", *convert.GROUPS)
SOURCE_PLACEHOLDER = "OUTPUT_DIR"  # stands for the study's output directory in a retrofit run's model.path


def step0_policy(out_dir: str | Path, source: str, seed: int) -> Path:
    """The warm-started policy of the run of experiment ``source`` at ``seed`` (``rl.checkpoint``'s step 0, a
    transformers checkpoint with its tokenizer): where a retrofit run of that seed starts."""
    return Path(out_dir) / source / f"seed_{seed}" / "checkpoints" / "step_000000" / "policy"


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    group: str
    base: Path
    overrides: tuple[str, ...]  # one section.field=value per field, model.group first: the driver's command line
    unavailable: str | None = None  # why it cannot run yet; None when it can
    source: Experiment | None = None  # retrofit_from: the baseline experiment whose step-0 checkpoint it converts

    def config(self, extra: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
        """The run's config: the base preset, the experiment's overrides, then ``extra`` (scalars, as given).
        A retrofit experiment needs ``model.path`` in ``extra`` (its source run's ``step0_policy``)."""
        if self.unavailable:
            raise ValueError(f"experiment {self.name!r} is not available: {self.unavailable}")
        if self.source is not None and not any(e.startswith("model.path=") for e in extra):
            raise ValueError(f"experiment {self.name!r} retrofits the step-0 checkpoint of a run of "
                             f"{self.source.name!r}: give model.path=step0_policy(output_dir, "
                             f"{self.source.name!r}, seed) (scripts/run_ablation.py sets it for each seed)")
        return load_config(self.base, [*self.overrides, *extra])

    def placeholder_path(self) -> str:
        """``model.path=...`` for a retrofit experiment outside a study (validation, the dry run): its source's
        step-0 policy at the run's seed under ``SOURCE_PLACEHOLDER``; the path need not exist."""
        assert self.source is not None, f"{self.name} is not a retrofit experiment"
        seed = load_config(self.base, [o for o in self.overrides if o.startswith("trainer.")]).trainer.seed
        return f"model.path={step0_policy(SOURCE_PLACEHOLDER, self.source.name, seed)}"


def resolve_path(path: str | Path) -> Path:
    """An absolute path: as given if it exists from the current directory, else relative to the repository."""
    path = Path(path)
    return path.resolve() if path.is_absolute() or path.exists() else ROOT / path


def yaml_value(value: object) -> str:
    """A value as one line of YAML that ``parse_overrides`` reads back unchanged (floats keep their dot)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    return text.removesuffix("\n...\n").strip()


def merge_overrides(base: ExperimentConfig, items: list[str]) -> list[str]:
    """``items`` as one ``section.field=value`` per field, in first-seen order; a dict given for a dict field is
    merged into the value so far (the base config's, then earlier items'), later keys winning."""
    merged: dict[str, object] = {}
    for section, given in ((s, g) for item in items for s, g in parse_overrides([item]).items()):
        for name, value in given.items():
            key = f"{section}.{name}"
            old = merged[key] if key in merged else getattr(getattr(base, section, None), name, None)
            merged[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    return [f"{key}={yaml_value(value)}" for key, value in merged.items()]


def option_exists(option: str) -> bool:
    """Whether ``section.field`` is a field of the typed config (``rl.config``)."""
    section, _, name = option.partition(".")
    return section in SECTIONS and name in {f.name for f in dataclasses.fields(SECTIONS[section])}


# ---- loading and validation -------------------------------------------------------------------------------

def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"experiments file {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"experiments file {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("experiments"), dict) or not data["experiments"]:
        raise ValueError(f"experiments file {path}: expected a mapping with a non-empty 'experiments' mapping")
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise ValueError(f"experiments file {path}: unknown key(s) {unknown}; valid keys are {list(FILE_KEYS)}")
    return data


def _check_entry(name: str, entry: object, names: set[str]) -> dict:
    """The entry's own fields checked for shape (types, unknown keys, what extends names)."""
    if not isinstance(entry, dict):
        raise ValueError(f"experiment {name!r}: expected a mapping of {list(ENTRY_KEYS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ValueError(f"experiment {name!r}: unknown key(s) {unknown}; valid keys are {list(ENTRY_KEYS)}")
    if not isinstance(entry.get("description"), str) or not entry["description"].strip():
        raise ValueError(f"experiment {name!r}: description must be a non-empty string (what the experiment tests)")
    overrides = entry.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError(f"experiment {name!r}: overrides must be a list of 'section.field=value' strings, "
                         f"got {overrides!r}")
    for key in ("group", "base", "extends", "requires_group", "requires_option", "retrofit_from"):
        if key in entry and not isinstance(entry[key], str):
            raise ValueError(f"experiment {name!r}: {key} must be a string, got {entry[key]!r}")
    for key in ("extends", "retrofit_from"):
        if key in entry and entry[key] not in names:
            raise ValueError(f"experiment {name!r}: {key}={entry[key]!r} is not an experiment of this file; "
                             f"experiments are {sorted(names)}")
    if "extends" not in entry and "group" not in entry:
        raise ValueError(f"experiment {name!r}: give its group (one of {list(models.GROUPS)}) or what it extends")
    return entry


def _flatten(name: str, entries: dict, default_base: str) -> dict:
    """The entry with what it extends filled in: group, base and requirements inherited, overrides prepended."""
    chain, current = [], name
    while current is not None:
        if current in chain:
            raise ValueError(f"experiment {name!r}: extends loops ({' -> '.join([*chain, current])})")
        chain.append(current)
        current = entries[current].get("extends")
    flat: dict = {"base": default_base, "overrides": []}
    for link in reversed(chain):  # the root first, so each experiment's own values win
        entry = entries[link]
        flat.update({k: v for k, v in entry.items() if k in INHERITED})
        flat["overrides"] = flat["overrides"] + entry.get("overrides", [])
    return {**flat, "description": entries[name]["description"]}


def _check_overrides(name: str, items: list[str]) -> None:
    try:
        parsed = parse_overrides(items)
    except ValueError as e:
        raise ValueError(f"experiment {name!r}: {e}") from None
    given = {f"{s}.{f}" for s, fields in parsed.items() for f in fields}
    if "model.group" in given:
        raise ValueError(f"experiment {name!r}: overrides set model.group; give it as the experiment's group")
    taken = sorted(given & set(RUN_FIELDS))
    if taken:
        raise ValueError(f"experiment {name!r}: overrides set {taken}, which scripts/run_ablation.py sets for "
                         "each run (the seed and the run directory); remove them")


def _unavailable(name: str, flat: dict) -> str | None:
    group, needed, option = flat["group"], flat.get("requires_group"), flat.get("requires_option")
    if needed is not None and needed != group:
        raise ValueError(f"experiment {name!r}: requires_group={needed!r} differs from its group {group!r}")
    if group not in models.GROUPS:
        if needed != group:
            raise ValueError(f"experiment {name!r}: group={group!r} is unknown; valid groups are "
                             f"{list(models.GROUPS)} (a planned group: add requires_group: {group})")
        return f"group {group} does not exist yet"
    if option is not None and not option_exists(option):
        return f"config option {option} does not exist yet"
    return None


def _check_model(name: str, cfg: ExperimentConfig, retrofit: bool = False) -> None:
    """The preset model's config built as the driver builds it (``models.tiny_config``), and its override keys
    checked: transformers configs keep unknown keyword arguments as attributes, so a typo would pass silently.
    A retrofit's overrides are fields of its group's config too (the conversion sets them, ``models.convert``)."""
    if cfg.model.path and not retrofit:
        return  # a checkpoint: the driver loads its own config
    try:  # tiny_config refuses an override that is not a field of the group's config
        models.tiny_config(cfg.model.group, **cfg.model.overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f"experiment {name!r}: model.overrides={cfg.model.overrides}: {e}") from None


def _check_source(name: str, flat: dict, source: Experiment | None) -> str | None:
    """A retrofit experiment's source checked (a baseline, an MLA group to convert to, model.path left to the
    study); -> why it cannot run while its source cannot, else None."""
    if source is None:
        return None
    if source.group != "baseline":
        raise ValueError(f"experiment {name!r}: retrofit_from={source.name!r} is of group {source.group!r}; the "
                         "source of a retrofit must be a baseline experiment (a Qwen2, models.convert's input)")
    if flat["group"] not in RETROFIT_GROUPS:
        raise ValueError(f"experiment {name!r}: group={flat['group']!r} has no retrofit; a retrofit experiment "
                         f"must be one of {list(RETROFIT_GROUPS)}")
    if flat["group"] == "baseline" and any(o.startswith("model.") for o in flat["overrides"]):
        raise ValueError(f"experiment {name!r}: a baseline retrofit continues {source.name!r}'s checkpoint as it is "
                         "(the driver loads its config), so model.* overrides would not apply; remove them")
    if any(o.startswith("model.path=") for o in flat["overrides"]):
        raise ValueError(f"experiment {name!r}: overrides set model.path, which retrofit_from={source.name!r} "
                         "sets for each run (the source run's step-0 checkpoint); remove it")
    return f"its source experiment {source.name} is not available: {source.unavailable}" if source.unavailable \
        else None


def build_experiment(name: str, flat: dict, extra: list[str], source: Experiment | None = None) -> Experiment:
    """One experiment, validated: its overrides resolved against its base and its config and model config built.
    ``source``: the experiment ``retrofit_from`` names, built already."""
    _check_overrides(name, [*flat["overrides"], *extra])
    base = resolve_path(flat["base"])
    unavailable = _unavailable(name, flat) or _check_source(name, flat, source)
    items = [f"model.group={flat['group']}", *flat["overrides"], *extra]
    if unavailable:  # its group or option does not exist: nothing to resolve against yet
        return Experiment(name, flat["description"], flat["group"], base, tuple(items), unavailable, source)
    experiment = Experiment(name, flat["description"], flat["group"], base, (), None, source)
    try:
        overrides = tuple(merge_overrides(load_config(base), items))
        experiment = dataclasses.replace(experiment, overrides=overrides)
        cfg = experiment.config([experiment.placeholder_path()] if source else [])
    except ValueError as e:
        raise ValueError(f"experiment {name!r} (base {base}): {e}") from None
    _check_model(name, cfg, retrofit=source is not None)
    if source is not None and cfg.data != source.config().data:
        raise ValueError(f"experiment {name!r}: its data section differs from that of its source {source.name!r}, so "
                         "a seed would not give both the same problems; give them the same base and data overrides")
    return experiment


def load_experiments(path: str | Path = DEFAULT_FILE, base: str | Path | None = None,
                     extra: list[str] | None = None) -> dict[str, Experiment]:
    """Every experiment of the file, validated, in file order. ``base`` replaces every experiment's preset;
    ``extra`` overrides (``section.field=value``) go after each experiment's own."""
    path = resolve_path(path)
    data = _read(path)
    entries = {str(n): _check_entry(str(n), e, set(map(str, data["experiments"])))
               for n, e in data["experiments"].items()}
    default = str(data.get("base", DEFAULT_BASE))
    flats = {name: _flatten(name, entries, default) for name in entries}
    built: dict[str, Experiment] = {}
    # Sources before the retrofits that name them (a source of a source is refused: it must be a baseline).
    for name in sorted(flats, key=lambda n: "retrofit_from" in flats[n]):
        flat = flats[name]
        if base is not None:
            flat["base"] = str(base)
        source = flat.get("retrofit_from")
        if source is not None and source not in built:
            raise ValueError(f"experiment {name!r}: retrofit_from={source!r} is itself a retrofit; the source of a "
                             "retrofit must be a baseline experiment")
        built[name] = build_experiment(name, flat, list(extra or []), built.get(source))
    return {name: built[name] for name in entries}


def select(experiments: dict[str, Experiment], names: list[str] | None) -> list[Experiment]:
    """The named experiments in the order given (all of them for None); an unknown name lists the valid ones."""
    if not names:
        return list(experiments.values())
    unknown = [n for n in names if n not in experiments]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; valid experiments are {list(experiments)}")
    return [experiments[n] for n in dict.fromkeys(names)]


# ---- description ------------------------------------------------------------------------------------------

def lru_facts(model: torch.nn.Module) -> dict:
    """What the LRU modules of a built model do (read from the modules, not the config): how many there are,
    their iterations, conv kernel, halting and global-halting weight; the aux weights from its config."""
    units = [m for m in model.modules() if isinstance(m, models.LatentReasoningUnit)]
    if not units:
        return {"lru_layers": 0}

    def one(values: set) -> object:
        assert len(values) == 1, f"LRU layers of one model differ: {values}"
        return values.pop()

    config, adaptive = model.config, one({u.adaptive for u in units})
    return {"lru_layers": len(units), "iterations": one({u.iterations for u in units}),
            "halting": "adaptive" if adaptive else "fixed", "conv_kernel": one({u.conv.kernel_size[0] for u in units}),
            "global_halting": one({u.global_mix if u.halt_global is not None else 0.0 for u in units}),
            # the ponder cost enters the loss only with adaptive halting (models.lru.lru_summary)
            "aux_weights": {"stability": config.lru_stability_weight, "sparsity": config.lru_sparsity_weight,
                            "ponder": config.lru_ponder_weight if adaptive else 0.0}}


def _flops(config) -> int | None:
    """FLOPs per token from ``models.param_count.flops_per_token`` once it exists; None until then."""
    flops = getattr(param_count, "flops_per_token", None)
    return None if flops is None else int(flops(config))


def describe(experiment: Experiment) -> dict:
    """One row of the dry-run table, from the model ``rl.driver.build_model_and_tokenizer`` builds for it."""
    from rl.driver import build_model_and_tokenizer  # imports Ray: only when a model is described

    row = {"name": experiment.name, "group": experiment.group, "description": experiment.description,
           "base": str(experiment.base),
           "overrides": [o for o in experiment.overrides if not o.startswith("model.group=")],
           "retrofit_from": experiment.source.name if experiment.source else None,
           "available": experiment.unavailable is None, "reason": experiment.unavailable}
    if experiment.unavailable:
        return row
    if experiment.source is not None:
        cfg = experiment.config([experiment.placeholder_path()])
        model = retrofit_preview(experiment)
    else:
        cfg = experiment.config()
        model, _ = build_model_and_tokenizer(cfg)
    config = model.config
    return {**row, "model_class": type(model).__name__, "parameters": param_count.count_params(config),
            "flops_per_token": _flops(config), "cache_dtype": str(model.dtype).removeprefix("torch."),
            "cache_bytes_per_token": param_count.cache_bytes_per_token(config, model.dtype),
            **lru_facts(model), "fingerprint": _fingerprint(cfg, config)}


def retrofit_preview(experiment: Experiment, seed: int | None = None) -> torch.nn.Module:
    """The model a retrofit run of ``experiment`` trains, with its source's initial weights instead of the
    warm-started ones: the source experiment's model built as the driver builds it (``trainer.seed`` = ``seed``
    when given), converted in memory as the driver's ``retrofit`` converts a checkpoint (group, latent width,
    rotary size, LRU overrides). Its shapes -- parameters, cache, FLOPs -- are the run's; which rotary pairs it
    keeps may differ (here chosen from the weights, in a run from the task's text)."""
    from rl.driver import build_model_and_tokenizer

    assert experiment.source is not None, f"{experiment.name} is not a retrofit experiment"
    extra = [] if seed is None else [f"trainer.seed={seed}"]
    source, _ = build_model_and_tokenizer(experiment.source.config(extra))
    cfg = experiment.config([experiment.placeholder_path(), *extra]).model
    if cfg.group == "baseline":
        return source  # continued as it is, as the driver loads a Qwen2 checkpoint for the baseline
    return convert.convert_model(source, cfg.group, cfg.retrofit_kv_lora_rank, cfg.retrofit_qk_rope_head_dim,
                                 **cfg.overrides)


def _fingerprint(cfg: ExperimentConfig, config) -> str:
    """The run's config with the model's overrides replaced by the model config they produce: two experiments
    with the same fingerprint train the same thing."""
    run = cfg.to_dict()
    run["model"].pop("overrides")
    return yaml.safe_dump({"run": run, "model": config.to_dict()}, sort_keys=True)


def describe_all(experiments: list[Experiment]) -> list[dict]:
    """``describe`` of each, with ``same_as`` naming an earlier experiment that trains the identical thing."""
    rows, seen = [], {}
    for experiment in experiments:
        row = describe(experiment)
        fingerprint = row.pop("fingerprint", None)
        row["same_as"] = seen.get(fingerprint) if fingerprint else None
        if fingerprint:
            seen.setdefault(fingerprint, experiment.name)
        rows.append(row)
    return rows
