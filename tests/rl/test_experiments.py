"""The experiment list: it loads, bad entries fail naming the experiment and the field, and every available
experiment's model -- built by the driver's own ``build_model_and_tokenizer`` -- is what its name says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForCausalLM

import models
from models import param_count, presets
from rl.config import load_config, parse_overrides
from rl.driver import build_model_and_tokenizer
from rl.experiments import (
    describe_all,
    load_experiments,
    merge_overrides,
    option_exists,
    retrofit_preview,
    select,
    step0_policy,
    yaml_value,
)

ROOT = Path(__file__).resolve().parents[2]

MAIN = "mla_lru_adaptive"
STUDY = ["baseline", "baseline_matched", "mla_only", "mla_lru_fixed", "mla_lru_adaptive", "mla_lru_no_pos_mix",
         "mla_lru_no_global_halt", "mla_lru_minimal", "mla_lru_iter_2", "mla_lru_iter_4", "mla_lru_iter_8",
         "mla_lru_iter_16", "mla_lru_no_stability", "mla_lru_high_stability", "mla_lru_no_ponder",
         "mla_lru_high_ponder", "mla_lru_ce_only"]  # the reference study's 17
CONTROLS = ["mla_only_matched", "looped"]  # pre-registered controls (rl.stats.PREREGISTERED)
# the retrofit arm (rl.stats.RETROFIT_CONTRASTS)
RETROFITS = {"retrofit_baseline": "baseline", "retrofit_mla_only": "mla_only",
             "retrofit_mla_lru_fixed": "mla_lru_fixed", "retrofit_mla_lru_adaptive": "mla_lru_adaptive"}
AUX = ("lru_stability_weight", "lru_sparsity_weight", "lru_ponder_weight")
# What each ablation of the main experiment changes in its model's config, and nothing else.
ABLATIONS = {"mla_lru_no_pos_mix": {"lru_conv_kernel": 1}, "mla_lru_no_global_halt": {"lru_global_halting": 0.0},
             "mla_lru_iter_2": {"lru_max_iterations": 2}, "mla_lru_iter_4": {},
             "mla_lru_iter_8": {"lru_max_iterations": 8}, "mla_lru_iter_16": {"lru_max_iterations": 16},
             "mla_lru_no_stability": {"lru_stability_weight": 0.0},
             "mla_lru_high_stability": {"lru_stability_weight": 1.0}, "mla_lru_no_ponder": {"lru_ponder_weight": 0.0},
             "mla_lru_high_ponder": {"lru_ponder_weight": 0.01}}


@pytest.fixture(scope="module")
def experiments():
    return load_experiments()


@pytest.fixture(scope="module")
def built(experiments):
    """{name: the model the driver would train} for every available experiment (a retrofit: converted from its
    source's initial model, ``retrofit_preview``; the driver's own conversion is tested below)."""
    torch.set_num_threads(1)
    return {name: retrofit_preview(e) if e.source else build_model_and_tokenizer(e.config())[0]
            for name, e in experiments.items() if not e.unavailable}


def units(model) -> list[models.LatentReasoningUnit]:
    return [m for m in model.modules() if isinstance(m, models.LatentReasoningUnit)]


def config_diff(a, b) -> dict:
    a, b = a.config.to_dict(), b.config.to_dict()
    return {k: a[k] for k in a if a[k] != b.get(k)}


@torch.no_grad()
def forward(model):
    return model(torch.tensor([[3, 5, 7, 9, 11, 13, 15, 17]]))


def test_the_file_holds_the_study_and_its_controls(experiments):
    assert set(experiments) == set(STUDY + CONTROLS + list(RETROFITS))
    assert all(e.description for e in experiments.values())
    for name in CONTROLS:
        group = experiments[name].group
        expected = None if group in models.GROUPS else f"group {group} does not exist yet"
        assert experiments[name].unavailable == expected
    expected = None if option_exists("model.match_params") else "config option model.match_params does not exist yet"
    assert experiments["baseline"].unavailable == expected
    assert select(experiments, ["mla_only", "baseline_matched"])[1].name == "baseline_matched"
    with pytest.raises(ValueError, match=r"unknown experiment\(s\) \['nope'\]; valid experiments are"):
        select(experiments, ["nope"])


def test_unavailable_experiments_are_described_not_built(tmp_path):
    planned = tmp_path / "planned.yaml"
    planned.write_text(f"base: {ROOT / 'rl' / 'presets' / 'tiny.yaml'}\nexperiments:\n  future:\n"
                       "    description: a switch not written yet\n    group: mla_only\n"
                       "    requires_option: model.future_switch\n    overrides: [model.future_switch=true]\n")
    experiments = load_experiments(planned)
    rows = describe_all([e for e in experiments.values() if e.unavailable])
    assert len(rows) == 1 and all(not r["available"] and r["reason"].endswith("does not exist yet") for r in rows)
    with pytest.raises(ValueError, match="is not available"):
        experiments["future"].config()


def test_main_experiment_has_adaptive_and_global_halting_in_every_layer(built):
    model = built[MAIN]
    lru = units(model)
    assert len(lru) == model.config.num_hidden_layers
    assert all(u.adaptive and u.halt is not None and u.halt_global is not None and u.global_mix == 0.5 for u in lru)
    assert {u.iterations for u in lru} == {4}
    assert float(forward(model).aux_loss) > 0


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_changes_only_what_its_name_says(built, name):
    assert config_diff(built[name], built[MAIN]) == ABLATIONS[name]
    lru = units(built[name])
    assert len(lru) == len(units(built[MAIN]))
    want = {**built[MAIN].config.to_dict(), **ABLATIONS[name]}
    assert {u.iterations for u in lru} == {want["lru_max_iterations"]}
    assert {u.conv.weight.shape[-1] for u in lru} == {want["lru_conv_kernel"]}  # (C, 1, W) depthwise weights
    assert all((u.halt_global is not None) == (want["lru_global_halting"] > 0) for u in lru)


def test_ce_only_trains_without_any_lru_aux_loss(built):
    model = built["mla_lru_ce_only"]
    assert all(getattr(model.config, k) == 0 for k in AUX)
    assert set(config_diff(model, built[MAIN])) <= set(AUX)
    assert float(forward(model).aux_loss) == 0.0


def test_fixed_and_minimal_run_exactly_k_iterations(built):
    for name, k, kernel in (("mla_lru_fixed", 4, 3), ("mla_lru_minimal", 1, 1)):
        lru = units(built[name])
        assert lru and all(not u.adaptive and u.halt is None and u.kernel == kernel for u in lru), name
        assert torch.all(forward(built[name]).lru_iterations == k), name
    assert all(getattr(built["mla_lru_minimal"].config, k) == 0 for k in AUX)


def test_mla_only_has_no_lru_and_the_baselines_are_qwen2(built, experiments):
    assert isinstance(built["mla_only"], models.LatentReasoningForCausalLM) and not units(built["mla_only"])
    assert not built["mla_only"].config.use_lru
    matched = built["baseline_matched"]
    assert isinstance(matched, Qwen2ForCausalLM)
    # Matched to the adaptive group's model (its default: no global halting) within half an MLP unit's parameters.
    d, layers = matched.config.hidden_size, matched.config.num_hidden_layers
    target = param_count.count_params(built["mla_lru_no_global_halt"].config)
    assert abs(param_count.count_params(matched.config) - target) <= 3 * d * layers / 2
    if "baseline" in built:  # once the unmatched option exists: the tiny preset's own MLP width, fewer parameters
        assert isinstance(built["baseline"], Qwen2ForCausalLM)
        assert built["baseline"].config.intermediate_size == presets.TINY["intermediate_size"]
        assert param_count.count_params(built["baseline"].config) < param_count.count_params(matched.config)


def test_the_controls_once_their_groups_exist(built):
    """mla_only_matched: no LRU, the adaptive group's parameters; looped: builds (its structure is its group's)."""
    if "mla_only_matched" not in built:
        pytest.skip("group mla_only_matched does not exist yet")
    model = built["mla_only_matched"]
    assert isinstance(model, models.LatentReasoningForCausalLM) and not units(model)
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    target = param_count.count_params(built["mla_lru_no_global_halt"].config)
    assert abs(param_count.count_params(model.config) - target) <= 3 * d * layers / 2


def test_the_described_numbers_are_the_built_models(built, experiments):
    rows = {r["name"]: r for r in describe_all(list(experiments.values()))}
    for name, model in built.items():
        assert rows[name]["parameters"] == sum(p.numel() for p in model.parameters()), name
        assert rows[name]["cache_bytes_per_token"] == param_count.cache_bytes_per_token(model.config, model.dtype)
        assert rows[name]["lru_layers"] == len(units(model))
    assert rows["mla_lru_iter_4"]["same_as"] == MAIN  # the sweep's K=4 is the main experiment itself
    assert sum(r["same_as"] is not None for r in rows.values()) == 1


# ---- overrides --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [{"a": 1e-5, "b": "x y", "c": [1, 2]}, 1e-5, "mod:fn", None, True, [], "/a b"])
def test_yaml_value_reads_back_unchanged(value):
    assert parse_overrides([f"s.f={yaml_value(value)}"]) == {"s": {"f": value}}


def test_dict_overrides_merge_into_the_base_and_later_keys_win():
    base = load_config(None, ["model.overrides={hidden_size: 64, lru_max_iterations: 2}"])
    merged = merge_overrides(base, ["model.overrides={lru_max_iterations: 8}", "trainer.lr=0.001",
                                    "model.overrides={lru_conv_kernel: 1}", "trainer.lr=0.002"])
    assert merged == ["model.overrides={hidden_size: 64, lru_conv_kernel: 1, lru_max_iterations: 8}",
                      "trainer.lr=0.002"]


def test_extra_overrides_reach_every_experiment():
    # A model field every group has (an LRU field would fail for the baseline, naming it).
    experiments = load_experiments(extra=["trainer.steps=3", "model.overrides={max_position_embeddings: 512}"])
    cfg = experiments["mla_lru_no_pos_mix"].config()
    assert cfg.trainer.steps == 3
    assert cfg.model.overrides == {"lru_conv_kernel": 1, "lru_global_halting": 0.5, "max_position_embeddings": 512}
    assert experiments["baseline_matched"].config().model.overrides == {"max_position_embeddings": 512}


# ---- bad files --------------------------------------------------------------------------------------------

def write(tmp_path, body: str):
    path = tmp_path / "experiments.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("entry, message", [
    ("{description: x, group: mla_only, grup: 1}", r"experiment 'bad': unknown key\(s\) \['grup'\]"),
    ("{description: x, group: mla_nothing}", r"experiment 'bad': group='mla_nothing' is unknown; valid groups"),
    ("{description: x, group: mla_only, overrides: [trainer.stepz=3]}",
     r"experiment 'bad' .*unknown field\(s\) \['trainer.stepz'\]"),
    ("{description: x, group: mla_only, overrides: [trainer.steps=many]}",
     r"experiment 'bad' .*trainer.steps='many': expected int"),
    ("{description: x, group: mla_only, overrides: [trainer.steps]}", r"experiment 'bad': override 'trainer.steps'"),
    ("{description: x, group: mla_lru_fixed, overrides: ['model.overrides={lru_iters: 3}']}",
     r"experiment 'bad': model.overrides=.*\['lru_iters'\] are not fields of the mla_lru_fixed config"),
    ("{description: x, group: baseline, overrides: ['model.overrides={lru_max_iterations: 3}']}",
     r"experiment 'bad': model.overrides=.*\['lru_max_iterations'\] are not fields of the baseline config"),
    ("{description: x, group: mla_lru_fixed, overrides: ['model.overrides={lru_conv_kernel: 0}']}",
     r"experiment 'bad': model.overrides=.*lru_conv_kernel=0: must be >= 1"),
    ("{description: x, group: mla_lru_fixed, overrides: ['model.overrides={lru_global_halting: 0.5}']}",
     r"experiment 'bad': .*lru_global_halting needs lru_halting='adaptive'"),
    ("{description: x, group: mla_only, overrides: [trainer.seed=3]}",
     r"experiment 'bad': overrides set \['trainer.seed'\]"),
    ("{description: x, group: mla_only, overrides: [model.group=baseline]}",
     r"experiment 'bad': overrides set model.group"),
    ("{description: x, group: mla_only, overrides: trainer.steps=3}", r"experiment 'bad': overrides must be a list"),
    ("{group: mla_only}", r"experiment 'bad': description must be a non-empty string"),
    ("{description: x}", r"experiment 'bad': give its group"),
    ("{description: x, extends: ghost}", r"experiment 'bad': extends='ghost' is not an experiment"),
    ("{description: x, extends: bad}", r"experiment 'bad': extends loops \(bad -> bad\)"),
    ("{description: x, group: looped, requires_group: loopy}", r"requires_group='loopy' differs from its group"),
    ("{description: x, group: mla_only, base: /nonexistent/preset.yaml}", r"experiment 'bad' .*cannot read it"),
])
def test_a_bad_entry_names_the_experiment_and_the_field(tmp_path, entry, message):
    path = write(tmp_path, f"experiments:\n  good: {{description: fine, group: mla_only}}\n  bad: {entry}\n")
    with pytest.raises(ValueError, match=message):
        load_experiments(path)


@pytest.mark.parametrize("body, message", [
    ("experiments: {}\n", "non-empty 'experiments' mapping"),
    ("experiment: {a: {description: x, group: mla_only}}\n", "non-empty 'experiments' mapping"),
    ("base: rl/presets/tiny.yaml\nextra: 1\nexperiments: {a: {description: x, group: mla_only}}\n",
     r"unknown key\(s\) \['extra'\]"),
    ("experiments: [\n", "not valid YAML"),
])
def test_a_bad_file_says_what_is_wrong(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        load_experiments(write(tmp_path, body))


def test_base_replaces_every_experiments_preset(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("trainer: {steps: 7}\nmodel: {overrides: {hidden_size: 64}}\n")
    experiments = load_experiments(base=preset)
    assert all(e.base == preset for e in experiments.values())
    cfg = experiments["mla_lru_iter_8"].config()
    assert cfg.trainer.steps == 7  # the preset's, not tiny.yaml's 20
    assert cfg.model.overrides == {"hidden_size": 64, "lru_global_halting": 0.5, "lru_max_iterations": 8}


# ---- the retrofit arm -------------------------------------------------------------------------------------

def test_the_retrofit_arm_converts_the_baseline_with_a_recovery_warm_start(experiments):
    for name, group in RETROFITS.items():
        e = experiments[name]
        assert e.group == group and e.source is experiments["baseline"] and e.unavailable is None
        cfg = e.config(["model.path=/study/baseline/seed_0/checkpoints/step_000000/policy"])
        assert cfg.trainer.sft_steps == 200 and cfg.model.path.endswith("step_000000/policy")
    assert experiments["retrofit_mla_lru_adaptive"].config([experiments["retrofit_mla_lru_adaptive"].placeholder_path(
    )]).model.overrides == {"lru_global_halting": 0.5}
    assert experiments["baseline"].config().model.match_params is False  # the source: the preset's own widths
    assert step0_policy("out", "baseline", 3) == Path("out/baseline/seed_3/checkpoints/step_000000/policy")
    with pytest.raises(ValueError, match="retrofits the step-0 checkpoint of a run of 'baseline': give model.path"):
        experiments["retrofit_mla_only"].config()


@pytest.fixture(scope="module")
def saved_baseline(experiments, tmp_path_factory):
    """A tiny random Qwen2 saved as a run saves its step-0 policy (weights, config, tokenizer)."""
    model, tokenizer = build_model_and_tokenizer(experiments["baseline"].config())
    path = tmp_path_factory.mktemp("baseline") / "policy"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, path


def test_each_retrofit_experiment_trains_what_its_name_says(experiments, saved_baseline, tmp_path):
    """The driver's own path (build_model_and_tokenizer on the saved Qwen2): the group's MLA model at the
    source's widths, the LRU groups computing exactly the converted mla_only model at start (the no-op gate)."""
    torch.set_num_threads(1)
    source, path = saved_baseline
    built = {}
    for name, group in RETROFITS.items():
        cfg = experiments[name].config([f"model.path={path}", f"logging.run_dir={tmp_path / name}"])
        built[name], _ = build_model_and_tokenizer(cfg)
        model = built[name]
        if group == "baseline":  # the control: the source's Qwen2 as it is, no conversion
            assert type(model) is type(source) and not (tmp_path / name / "retrofit").exists()
            converted, original = model.state_dict(), source.state_dict()
            assert converted.keys() == original.keys() and all(torch.equal(converted[k], original[k]) for k in original)
            continue
        assert isinstance(model, models.LatentReasoningForCausalLM), name
        assert (tmp_path / name / "retrofit" / "convert_info.json").is_file()
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            assert getattr(model.config, field) == getattr(source.config, field), (name, field)
        lru = units(model)
        if group == "mla_only":
            assert not lru and not model.config.use_lru
            continue
        assert len(lru) == model.config.num_hidden_layers and model.config.lru_residual_gate
        assert all(u.adaptive == (group == "mla_lru_adaptive") and u.iterations == 4 for u in lru)
    assert all(u.halt_global is not None and u.global_mix == 0.5 for u in units(built["retrofit_mla_lru_adaptive"]))
    assert all(u.halt is None for u in units(built["retrofit_mla_lru_fixed"]))
    logits = {name: forward(model.eval()).logits for name, model in built.items()}
    for name in ("retrofit_mla_lru_fixed", "retrofit_mla_lru_adaptive"):
        assert torch.equal(logits[name], logits["retrofit_mla_only"]), name  # the LRU starts as a no-op
    assert torch.equal(logits["retrofit_baseline"], forward(source.eval()).logits)


def retrofit_file(tmp_path, entry: str, extra: str = "") -> Path:
    return write(tmp_path, "experiments:\n  src: {description: a Qwen2, group: baseline, "
                           "overrides: [model.match_params=false]}\n  mla: {description: m, group: mla_only}\n"
                           f"{extra}  bad: {entry}\n")


@pytest.mark.parametrize("entry, message", [
    ("{description: x, group: mla_only, retrofit_from: ghost}",
     r"experiment 'bad': retrofit_from='ghost' is not an experiment of this file"),
    ("{description: x, group: mla_only, retrofit_from: [src]}", r"experiment 'bad': retrofit_from must be a string"),
    ("{description: x, group: mla_only, retrofit_from: mla}",
     r"experiment 'bad': retrofit_from='mla' is of group 'mla_only'; the source of a retrofit must be a baseline"),
    ("{description: x, group: baseline, retrofit_from: src, overrides: ['model.overrides={hidden_size: 32}']}",
     r"experiment 'bad': a baseline retrofit continues 'src'.s checkpoint as it is .*remove them"),
    ("{description: x, group: mla_only_matched, retrofit_from: src}",
     r"group='mla_only_matched' has no retrofit; a retrofit experiment must be one of \['baseline', 'mla_only'"),
    ("{description: x, group: mla_only, retrofit_from: src, overrides: [model.path=/x]}",
     r"experiment 'bad': overrides set model.path, which retrofit_from='src' sets for each run"),
    ("{description: x, group: mla_only, retrofit_from: src, overrides: [data.eval_size=3]}",
     r"experiment 'bad': its data section differs from that of its source 'src'"),
    ("{description: x, group: mla_lru_fixed, retrofit_from: src, overrides: ['model.overrides={lru_iters: 3}']}",
     r"experiment 'bad': model.overrides=.*\['lru_iters'\] are not fields of the mla_lru_fixed config"),
    ("{description: x, group: mla_only, retrofit_from: r1}", r"experiment 'bad': retrofit_from='r1' is itself a "
     r"retrofit|experiment 'bad': retrofit_from='r1' is of group 'mla_only'"),
])
def test_a_bad_retrofit_entry_names_the_experiment_and_the_field(tmp_path, entry, message):
    extra = "  r1: {description: r, group: mla_only, retrofit_from: src}\n"
    with pytest.raises(ValueError, match=message):
        load_experiments(retrofit_file(tmp_path, entry, extra))


def test_a_retrofit_inherits_through_extends_and_sets_its_conversion(tmp_path):
    path = retrofit_file(tmp_path, "{description: x, extends: r1, overrides: [model.retrofit_kv_lora_rank=48]}",
                         "  r1: {description: r, group: mla_lru_fixed, retrofit_from: src}\n")
    experiments = load_experiments(path)
    bad = experiments["bad"]
    assert bad.source.name == "src" and bad.group == "mla_lru_fixed"
    assert retrofit_preview(bad).config.kv_lora_rank == 48  # a shaped conversion validates without a checkpoint
