"""Config: YAML recipes, dotted overrides, unknown keys and bad values rejected with a clear message."""

from __future__ import annotations

import pytest

from draftopd import DraftopdError
from draftopd.config import BenchConfig, load


def test_defaults_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("limit: 3\nsampling:\n  temperature: 0.5\n")
    cfg = load(BenchConfig, recipe, ["sampling.max_new_tokens=64", "datasets=gsm8k,mtbench", "target.dtype=fp32"])
    assert cfg.limit == 3 and cfg.sampling.temperature == 0.5 and cfg.sampling.max_new_tokens == 64
    assert cfg.datasets == ("gsm8k", "mtbench") and cfg.target.dtype == "fp32"
    assert cfg.drafter.kind == "pld"  # untouched default
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
