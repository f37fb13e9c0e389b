"""Config: YAML recipes, dotted overrides, unknown keys and bad values rejected with a clear message."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from draftopd import DraftopdError
from draftopd.config import OPD_RECIPES, BenchConfig, DemoConfig, DrafterConfig, LoopConfig, OPDConfig, SFTConfig
from draftopd.recipes import LOOP_KEYS, load, migrate_loop, to_dict

RECIPES = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("limit: 3\nsampling:\n  temperature: 0.5\n")
    cfg = load(BenchConfig, recipe, ["sampling.max_new_tokens=64", "datasets=gsm8k,mtbench", "target.dtype=fp32"])
    assert cfg.limit == 3 and cfg.sampling.temperature == 0.5 and cfg.sampling.max_new_tokens == 64
    assert cfg.datasets == ("gsm8k", "mtbench") and cfg.target.dtype == "fp32"
    assert cfg.drafter is None and cfg.method_configs() == {"pld": DrafterConfig()}  # the default: prompt lookup
    # YAML 1.1 reads 1e-4 (no dot) as a string; a float field takes it as the number it is
    assert load(BenchConfig, None, ["sampling.top_p=1e-1"]).sampling.top_p == pytest.approx(0.1)
    with pytest.raises(AttributeError):
        cfg.limit = 4  # frozen


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampling.temprature=0.5", "unknown config key sampling.temprature"),
        ("limit=many", "limit: expected int"),
        ("sampling.temperature=hot", "sampling.temperature: expected a number"),
        ("sampling.temperature=[1]", "sampling.temperature: expected a number"),
        ("target.dtype=int8", "target.dtype must be"),
        ("sampling.top_p=0", "sampling.top_p must be in"),
        ("nonsense", "not of the form"),
    ],
)
def test_bad_values_are_rejected(override, message):
    with pytest.raises(DraftopdError, match=message):
        load(BenchConfig, None, [override])


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("limit: 3\nsampling: [unclosed\n")
    with pytest.raises(DraftopdError, match=r"bad\.yaml:\d+: invalid YAML"):
        load(BenchConfig, bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("drafter:\n  kind: pld\n  bogus: 1\n")
    with pytest.raises(DraftopdError, match=r"unknown\.yaml: unknown config key drafter\.bogus"):
        load(BenchConfig, unknown)


# --- the training loop section both trainers share (config.LoopConfig) ---


@pytest.mark.parametrize("cls", [SFTConfig, OPDConfig])
def test_a_partial_loop_section_keeps_the_trainers_other_defaults(cls, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loop:\n  max_steps: 5\n")
    defaults = cls().loop  # the trainer's own (SFT's and OPD's differ), not LoopConfig's class defaults
    for cfg in (load(cls, recipe), load(cls, None, ["loop.max_steps=5"])):
        assert cfg.loop == dataclasses.replace(defaults, max_steps=5)
    assert load(cls, None, ["loop.lr=0.5", "loop.seed=3"]).loop == dataclasses.replace(defaults, lr=0.5, seed=3)
    # nested one level down too: the demo's sections keep their trainer's loop
    section = "sft" if cls is SFTConfig else "opd"
    demo = load(DemoConfig, None, [f"{section}.loop.max_steps=5"])
    assert getattr(demo, section).loop == dataclasses.replace(defaults, max_steps=5)


def test_the_trainers_loop_defaults():
    assert SFTConfig().loop == LoopConfig()  # the class defaults are SFT's
    opd = OPDConfig().loop
    assert (opd.max_steps, opd.lr, opd.warmup_ratio, opd.min_lr_ratio, opd.adam_betas, opd.weight_decay) == (
        20, None, 0.05, 0.0, (0.9, 0.999), 0.01,
    )  # fmt: skip
    assert (opd.grad_clip, opd.seed, opd.log_every, opd.eval_every, opd.save_every, opd.keep_every) == (
        1.0, 0, 1, 5, 5, 0,
    )  # fmt: skip


@pytest.mark.parametrize("cls", [SFTConfig, OPDConfig])
@pytest.mark.parametrize("key", LOOP_KEYS)
def test_an_old_top_level_loop_key_names_its_new_place(cls, key, tmp_path):
    with pytest.raises(DraftopdError, match=rf"^config key {key} was renamed: use loop\.{key}$"):
        load(cls, None, [f"{key}=1"])
    recipe = tmp_path / "old.yaml"
    recipe.write_text(f"{key}: 1\n")
    with pytest.raises(DraftopdError) as e:
        load(cls, recipe)
    assert str(e.value) == f"{recipe}: config key {key} was renamed: use loop.{key}"
    assert "\n" not in str(e.value)


def test_older_names_point_into_the_loop_section():
    with pytest.raises(DraftopdError, match="config key steps was renamed: use loop.max_steps"):
        load(SFTConfig, None, ["steps=5"])
    with pytest.raises(DraftopdError, match="config key iterations was renamed: use loop.max_steps"):
        load(OPDConfig, None, ["iterations=5"])


def test_loop_values_are_checked_by_their_dotted_name():
    with pytest.raises(DraftopdError, match=r"^loop\.lr must be a finite number > 0 \(None, the kind's recipe, is"):
        load(SFTConfig, None, ["loop.lr=null"])  # only OPD takes its kind's recipe
    assert load(OPDConfig, None, ["loop.lr=null"]).loop.lr is None
    for override, name in [("loop.lr=-1", "loop.lr"), ("loop.warmup_ratio=2", "loop.warmup_ratio"),
                           ("loop.adam_betas=[0.9]", "loop.adam_betas"), ("loop.save_every=0", "loop.save_every"),
                           ("loop.seed=-1", "loop.seed"), ("loop.keep_every=-1", "loop.keep_every")]:  # fmt: skip
        with pytest.raises(DraftopdError, match=rf"^{name} must be"):
            load(OPDConfig, None, [override])


def test_for_kind_fills_loop_lr_from_the_recipe_and_keeps_a_stated_one():
    for kind, recipe in OPD_RECIPES.items():
        cfg = OPDConfig().for_kind(kind)
        assert cfg.loop.lr == recipe["lr"] and cfg.loss == recipe["loss"]
        assert dataclasses.replace(cfg.loop, lr=None) == OPDConfig().loop  # nothing else of the loop changed
    assert load(OPDConfig, None, ["loop.lr=0.5"]).for_kind("dflash").loop.lr == 0.5


def test_a_stored_config_of_the_old_layout_is_migrated(tmp_path):
    new = to_dict(load(SFTConfig, None, ["loop.max_steps=7", "loop.lr=0.01"]))
    old = {k: v for k, v in new.items() if k != "loop"} | new["loop"]  # how runs before the loop section stored it
    assert migrate_loop(old) == new and migrate_loop(new) == new
    bench = to_dict(BenchConfig())
    assert migrate_loop(bench) == bench  # not a trainer's config: as it is
    stage = tmp_path / "sft.yaml"  # a demo stage's config, written before the loop section
    stage.write_text(yaml.safe_dump(json.loads(json.dumps(old))))
    assert load(SFTConfig, stage, stored=True) == load(SFTConfig, None, ["loop.max_steps=7", "loop.lr=0.01"])
    with pytest.raises(DraftopdError, match="renamed: use loop"):
        load(SFTConfig, stage)  # a recipe in the old layout is refused


def test_methods_are_named_drafters_each_with_its_own_settings(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "methods:\n"
        "  prompt lookup: {kind: pld, num_tokens: 8}\n"
        "  sft: {kind: path, path: runs/x/final, chain_length: 4, confidence: 0.7}\n"
        "  shape: {kind: shape, arch: {kind: eagle3, draft_vocab_size: 8192}, chain_length: 2}\n"
    )
    cfg = load(BenchConfig, recipe, ["methods.sft.confidence=0"])  # an override reaches one method only
    assert list(cfg.method_configs()) == ["prompt lookup", "sft", "shape"]  # the recipe's order
    sft, shape = cfg.methods["sft"], cfg.methods["shape"]
    assert (sft.kind, sft.path, sft.chain_length, sft.confidence) == ("path", "runs/x/final", 4, 0.0)
    assert cfg.methods["prompt lookup"].num_tokens == 8 and shape.arch.draft_vocab_size == 8192
    assert load(BenchConfig, recipe) != cfg and load(BenchConfig, recipe).methods["sft"].confidence == 0.7


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["methods={sft: {kind: path, path: x, chain_lenght: 3}}"], "unknown config key methods.sft.chain_lenght"),
        (
            ["methods={sft: {kind: shape, arch: {kind: eagle3, blocks: 2}}}"],
            "unknown config key methods.sft.arch.blocks",
        ),
        (["methods={sft: {kind: path, path: x}}", "methods.sfft.confidence=0"], "methods.sfft: no kind given"),
        (["methods={sft: {kind: path, path: x, chain_length: 0}}"], "methods.sft: drafter.chain_length must be >= 1"),
        (["methods={sft: {kind: path}}"], "methods.sft: drafter.path must be a drafter folder"),
        (["methods={sft: {kind: shape}}"], "methods.sft: drafter.arch must be a shape"),
        (["methods={plain: {kind: pld}}"], "methods.plain must be another name"),
        (["methods={sft: }"], "methods.sft: expected a section"),  # not a default section (prompt lookup) named sft
        (["methods={'gate 0.5': {kind: pld}}"], "a name must be a one-line string without dots"),
        (["methods={a: {kind: pld}}", "drafter.kind=pld"], "drafter and methods are both set"),
    ],
)
def test_bad_methods_are_refused_with_their_dotted_path(overrides, message):
    with pytest.raises(DraftopdError, match=message) as e:
        load(BenchConfig, None, overrides)
    assert "\n" not in str(e.value)


def test_the_old_list_of_name_spec_strings_is_refused_in_one_line(tmp_path):
    """``methods: [SFT=folder, lookup=pld]`` (before methods were named drafters) says how to write the new form."""
    recipe = tmp_path / "old.yaml"
    recipe.write_text("methods: [SFT=runs/sft/final, lookup=pld]\n")
    for source, overrides in ((recipe, []), (None, ["methods=[SFT=runs/sft/final,lookup=pld]"])):
        with pytest.raises(DraftopdError) as e:
            load(BenchConfig, source, overrides)
        msg = str(e.value)
        assert "\n" not in msg and "name=spec" in msg and "methods: {" in msg and "kind: path, path:" in msg
    assert load(BenchConfig, None, ["tau_only=true", "methods={plain: {kind: none}}"]).methods  # no baseline row


def test_drafter_is_the_one_method_form():
    """What ``--drafter`` sets: one method, named after its kind or its folder."""
    folder = load(BenchConfig, None, ["drafter.kind=path", "drafter.path=runs/sft/final", "drafter.confidence=0"])
    assert list(folder.method_configs()) == ["final"] and folder.method_configs()["final"].confidence == 0
    assert list(load(BenchConfig, None, ["drafter.kind=none"]).method_configs()) == ["none"]


@pytest.mark.parametrize(
    "override, field",
    [
        ("cost_curve.widths=[2, 4]", "cost_curve.widths"),  # no width 1: nothing to take ratios over
        ("cost_curve.widths=[1, 4, 4]", "cost_curve.widths"),
        ("cost_curve.context=0", "cost_curve.context"),
        ("cost_curve.reps=0", "cost_curve.reps"),
        ("lossless_prompts=-1", "lossless_prompts"),
    ],
)
def test_bench_cost_curve_and_lossless_check_are_checked(override, field):
    with pytest.raises(DraftopdError, match=f"^{field} must be"):
        load(BenchConfig, None, [override])


def test_the_bench_recipes_load():
    costs = load(BenchConfig, RECIPES / "bench-costs.yaml")
    shapes = [d for d in costs.methods.values() if d.kind == "shape"]
    assert len(shapes) == 10 and costs.methods["prompt lookup"].kind == "pld"  # the one that accepts: its budget
    assert {d.confidence for d in shapes} == {0.0}  # every proposal verified whole
    assert costs.cost_curve.widths == (1, 2, 4, 8, 16, 24, 32, 48, 64) and costs.lossless_prompts == 0
    assert costs.methods["eagle3 chain 4, draft vocab 8k"].chain_length == 4
    sweep = load(BenchConfig, RECIPES / "bench-confidence.yaml").methods
    learned = [d for d in sweep.values() if d.kind == "path"]
    assert sweep["prompt lookup"].kind == "pld" and len({d.path for d in learned}) == 1  # one drafter, its settings
    assert [(d.chain_length, d.confidence) for d in learned] == [(4, 0.0), (6, 0.5), (6, 0.7)]
    assert load(BenchConfig, RECIPES / "bench.yaml").method_configs()["pld"].num_tokens == 10


def test_a_drafter_folder_named_like_a_baseline_keeps_its_own_row():
    cfg = load(BenchConfig, None, ["drafter.kind=path", "drafter.path=runs/x/plain"])
    assert list(cfg.method_configs()) == ["plain (drafter)"]
    assert list(
        load(BenchConfig, None, ["tau_only=true", "drafter.kind=path", "drafter.path=x/plain"]).method_configs()
    ) == ["plain"]  # tau_only has no baseline row
