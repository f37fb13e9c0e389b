"""The recipe loader: YAML recipes and dotted overrides -> the frozen dataclasses of ``config.py``.

``load(BenchConfig, "configs/bench.yaml", ["sampling.temperature=0.7", "limit=5"])`` reads the recipe, applies the
overrides (values parsed as YAML scalars), and builds the dataclass tree. Any key the dataclass does not declare
raises ``DraftopdError`` naming the key and the file. Every field has a default, so a recipe states only what
differs; a section it states in part keeps the rest of that field's default (SFT's and OPD's ``loop`` sections
differ). ``to_dict`` of the result is what we write into every checkpoint and benchmark JSON.

The shims for keys of older releases (``RENAMED``, ``migrate_loop``) are at the end, under their own header.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from draftopd import DraftopdError
from draftopd.config import DrafterConfig, LoopConfig, OPDConfig, SFTConfig

T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str, base: Any = None) -> Any:
    """Check/convert a YAML value against a field's annotation (only the types our configs use); a section (a
    dataclass field) is built on top of ``base``, the value it has when the section is left out."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        return from_dict(tp, value, key + ".", base)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args[1:]:  # int | str (tree_budget: a number or 'auto'): the first type that takes the value
            if isinstance(value, a) and not isinstance(value, bool):
                return value
        return _coerce(value, args[0], key)
    if origin is dict:  # named sections, e.g. methods: {SFT: {kind: path, ...}}; a name's key path is key.NAME
        section = typing.get_args(tp)[1]
        if not isinstance(value, dict):
            raise DraftopdError(
                f"{key}: expected a mapping of names to sections, e.g. {key}: {getattr(section, 'EXAMPLE', '{}')}; "
                f"not {str(value)[:60]!r} (a list of name=spec strings is no longer read)"
            )
        out = {}
        for name, v in value.items():
            if not (isinstance(name, str) and name.strip() and name.isprintable() and "." not in name):
                raise DraftopdError(  # a dot would split the name in a dotted override (--set key.NAME.field=...)
                    f"{key}: a name must be a one-line string without dots, not {str(name)[:40]!r}"
                )
            where = f"{key}.{name}"
            if not isinstance(v, dict):
                raise DraftopdError(f"{where}: expected a section (a mapping), not {str(v)[:40]!r}")
            # a section with a kind states it: a misspelt name in an override must not add a default section
            if "kind" in typing.get_type_hints(section) and "kind" not in v:
                raise DraftopdError(f"{where}: no kind given (a new name needs {where}.kind)")
            try:
                out[name] = _coerce(v, section, where)
            except DraftopdError as e:  # a range error names the section's field only: say which name it is
                raise DraftopdError(str(e) if where in str(e) else f"{where}: {e}") from None
        return out
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise DraftopdError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], key) for v in value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float:  # YAML 1.1 reads "1e-4" (no dot) as a string: accept any string float() parses
        try:
            if isinstance(value, str):
                return float(value)
        except ValueError:
            pass
        raise DraftopdError(f"{key}: expected a number, got {value!r}")
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if tp in (bool, int, str) and not (isinstance(value, tp) and (tp is bool or not isinstance(value, bool))):
        raise DraftopdError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (None when it has none)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def from_dict(cls: type[T], data: dict | None, prefix: str = "", base: T | None = None) -> T:
    """Build dataclass ``cls`` from a nested dict; an unknown key raises with its dotted path. The keys a section
    leaves out keep the values of ``base`` (by default the class defaults): a nested section starts from its field's
    default, e.g. ``loop: {max_steps: 5}`` keeps the other values of the trainer's own loop defaults."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise DraftopdError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    renamed = {**RENAMED_EVERYWHERE, **RENAMED.get(cls, {})}
    for key in data:
        if key in renamed and key not in fields:
            raise DraftopdError(f"config key {prefix}{key!s} was renamed: use {renamed[key]}")
        if key not in fields:
            raise DraftopdError(f"unknown config key {prefix}{key!s} (known: {', '.join(fields)})")
    bases = {k: getattr(base, k) if base is not None else _default(fields[k]) for k in data}  # a section's start
    values = {k: _coerce(v, hints[k], prefix + k, bases[k]) for k, v in data.items()}
    return cls(**values) if base is None else dataclasses.replace(base, **values)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What a YAML error says, on one line (a ReaderError's text spans several)."""
    return " ".join(str(getattr(e, "problem", None) or getattr(e, "reason", None) or e).split())


def apply_override(data: dict, override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as a YAML scalar) to a nested dict in place."""
    if "=" not in override:
        raise DraftopdError(f"override {override!r} is not of the form key.path=value")
    key, raw = override.split("=", 1)
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise DraftopdError(f"override {override!r}: {key.strip()!r} is not a dotted key such as sampling.top_p")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise DraftopdError(f"override {override!r}: invalid YAML value ({_yaml_problem(e)})") from None
    except (RecursionError, ValueError) as e:  # nesting too deep for the parser, a 5000-digit integer
        raise DraftopdError(f"override {key.strip()}=...: invalid YAML value ({type(e).__name__})") from None
    node = data
    for p in parts[:-1]:
        if node.get(p) is None:  # a new section, or one the recipe left empty (``loop:`` with nothing under it)
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise DraftopdError(f"override {override!r}: {p} is not a section")
    node[parts[-1]] = value


def load(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), stored: bool = False
) -> T:
    """Read a YAML recipe (optional), apply dotted overrides, return the frozen config. ``stored``: the recipe is
    one this program wrote earlier (a demo stage's), read in an older layout too (``migrate_loop``), not refused."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise DraftopdError(f"config file not found: {p}")
        if not p.is_file():
            raise DraftopdError(f"config {p} is not a file (a YAML recipe is)")
        try:
            raw = p.read_bytes()
            data = yaml.safe_load(raw.decode("utf-8"))
        except OSError as e:
            raise DraftopdError(f"{p}: cannot be read ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DraftopdError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise DraftopdError(f"{p}{line}: invalid YAML ({_yaml_problem(e)})") from None
        except (RecursionError, ValueError) as e:  # nesting too deep for the parser, a 5000-digit integer
            raise DraftopdError(f"{p}: invalid YAML ({type(e).__name__})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise DraftopdError(
                f"{p}: expected a mapping of config keys at the top level, not a {type(data).__name__}"
            )
        if stored:
            data = migrate_loop(data)
    for o in overrides:
        apply_override(data, o)
    try:
        return from_dict(cls, data)
    except DraftopdError as e:
        raise DraftopdError(f"{path}: {e}" if path else str(e)) from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Shims for recipes and stored configs of older releases (as of 2026-12-07). A key an older release used for
# something else is refused with a one-line error naming its new key; a stored config (a checkpoint's
# ``run_config.json``, a demo stage's YAML) written before the ``loop`` section is migrated when read.

LOOP_KEYS = tuple(f.name for f in dataclasses.fields(LoopConfig))
LOOP_RENAMED = {k: f"loop.{k}" for k in LOOP_KEYS}  # SFT's and OPD's keys that moved into the loop section
OPD_DATA = "data (OPD draws its rollout prompts, and in replay mode the trajectories, from the SFT data folder)"
RENAMED_EVERYWHERE = {"gsm8k_path": "the --gsm8k PATH flag or $DRAFTOPD_GSM8K"}  # keys no config has any more
RENAMED: dict[type, dict[str, str]] = {
    DrafterConfig: {"steps": "chain_length"},
    SFTConfig: {
        **LOOP_RENAMED,
        "steps": "loop.max_steps",
        "drafter": "arch",
        "bf16_autocast": "target.dtype (autocast follows it)",
    },
    OPDConfig: {
        **LOOP_RENAMED,
        "iterations": "loop.max_steps",
        "steps": "chain_length",
        "sources": OPD_DATA,
        "limit_per_source": OPD_DATA,
        "max_prompt_tokens": OPD_DATA,
        "random_anchors": "anchors: random",
    },
}


def migrate_loop(stored: dict) -> dict:
    """A stored SFT or OPD config written before the loop section, with its top-level loop keys moved under
    ``loop``; a config without them (any other) as it is."""
    moved = {k: stored[k] for k in LOOP_KEYS if k in stored}
    if not moved or "loop" in stored:  # the current layout (or one we never wrote: compared as it is)
        return stored
    return {**{k: v for k, v in stored.items() if k not in moved}, "loop": moved}
