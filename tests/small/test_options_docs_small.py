"""The README's option tables and mentions, and configs/<mode>.toml, match the declarations."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
from support.servers import REPO_ROOT

from influx_spout.config import (
    ALIASES,
    IGNORED,
    SharedOptions,
    declarations,
    environment,
    load_config,
)
from influx_spout.encoders import ENCODERS
from influx_spout.encoders.json_mapping import MAPPING_KEYS
from influx_spout.modes import MODES, module

KINDS = {"str", "int", "bool", "size", "duration", "subjects", "strings"}
KINDS |= {"rules", "time", "client", "json_mapping", "access", "table"}

# Options an example sets to something else than the default: they have no usable default.
REQUIRED = {"mode", "kafka_topics", "rule"}


def readme_section(title: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    return text.split(f"\n{title}\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


def shared_table() -> dict[str, list[str]]:
    """The README's "Configuration (all modes)" table: option -> [default, modes, meaning]."""
    rows = {}
    for line in readme_section("## Configuration (all modes)").splitlines():
        m = re.fullmatch(r"\| `([a-z_]+)` \| (.*) \|", line)
        if m:
            rows[m.group(1)] = [cell.strip() for cell in m.group(2).split(" | ")]
    return rows


def modes_cell(modes: tuple[str, ...]) -> str:
    missing = [m for m in MODES if m not in modes]
    if not missing:
        return "all"
    if len(missing) == 1:
        return f"all but {missing[0]}"
    return ", ".join(modes)


def default_cell(name: str) -> str:
    """How the table shows a default, and the defaults that differ by mode."""
    opt = declarations()[name]
    if opt.per_mode and set(opt.per_mode) == set(opt.modes):
        return ", ".join(f"`{opt.shown(m)}` ({m})" for m in opt.modes)
    other = "".join(f", `{opt.shown(m)}` ({m})" for m in opt.per_mode)
    return f"`{opt.shown('')}`{other}"


def test_declarations_are_complete() -> None:
    for name, opt in declarations().items():
        assert opt.kind in KINDS, name
        assert set(opt.modes) <= set(MODES) and opt.modes, name
        assert set(opt.per_mode) <= set(opt.modes), name
        assert opt.help and "\n" not in opt.help, name
        assert opt.at_least is None or opt.kind == "int", name
        for alias in opt.aliases:
            assert alias.old not in declarations(), alias
    assert set(ALIASES).isdisjoint(IGNORED)
    for name, (mode, variable) in environment().items():
        assert mode in (*MODES, "") and variable.isupper(), name  # "": every mode


def test_every_mode_module_declares_options_and_validates() -> None:
    for mode in MODES:
        mod = module(mode)
        assert dataclasses.is_dataclass(mod.Options), mode
        assert callable(mod.validate), mode


def test_readme_shared_table_matches_the_declarations() -> None:
    table = shared_table()
    shared = [f.name for f in dataclasses.fields(SharedOptions)]
    assert list(table) == shared
    for name in shared:
        opt = declarations()[name]
        default, modes, meaning = table[name]
        assert modes == modes_cell(opt.modes), name
        if name == "mode":
            listed = ", ".join(f"`{m}`" for m in MODES)
            assert (default, meaning) == ("(required)", f"{opt.help}: {listed}")
            continue
        if name != "name":  # its default is the file name
            assert default.startswith(default_cell(name)), name
        assert meaning.replace("`", "") == opt.help, name


def test_readme_lists_every_alias() -> None:
    section = readme_section("## Configuration (all modes)")
    bullet = section.split("older option names", 1)[1].split("\n- ", 1)[0].split("\n\n", 1)[0]
    listed = {}
    for m in re.finditer(r"`(\w+)`(?:\s+and\s+`(\w+)`)?\s+\((\w+)\)", bullet):
        for old in m.group(1, 2):
            if old:
                listed[old] = m.group(3)
    assert listed == {old: new for old, (new, _unit, _factor) in ALIASES.items()}
    for ignored in IGNORED:
        assert f"`{ignored}` is accepted" in bullet


def _first_value(text: str) -> str:
    """The value a README mention gives in parentheses: `key` ("1MB", never above ...)."""
    text = text.strip()
    if text.startswith("["):
        return text[: text.index("]") + 1]
    return re.split(r"[,;]", text, maxsplit=1)[0].strip()


@pytest.mark.parametrize("mode", MODES)
def test_readme_mode_section_mentions_declared_options_with_their_defaults(mode: str) -> None:
    title = "### listener (UDP)" if mode == "listener" else f"### {mode}"
    section = readme_section(f"{title} — `configs/{mode}.toml`")
    names = set(declarations())
    for m in re.finditer(r"`([a-z_]+)` \(([^)]*)\)", section):
        name, value = m.group(1), _first_value(m.group(2))
        if name not in names or mode not in declarations()[name].modes:
            continue
        shown = declarations()[name].shown(mode)
        if re.fullmatch(r'"[^"]*"|[0-9][0-9_,]*|\[.*\]|true|false|[\w.:/-]+', value):
            assert value.replace(",", "").strip('"') == shown.strip('"'), (name, value)
    counters = {c for m in MODES for c in module(m).COUNTERS} | set(module("monitor").GAUGES)
    known = names | set(ALIASES) | set(IGNORED) | set(MODES) | set(ENCODERS) | counters
    known |= set(MAPPING_KEYS)
    for token in re.findall(r"`([a-z][a-z0-9]*_[a-z0-9_]+)`", section):
        assert token in known, f"README's {mode} section documents `{token}`, not declared"
    for name, opt in declarations().items():
        if opt.modes == (mode,):
            # `name`, `[name]` for a table, `name = value`
            assert re.search(rf"`\[*{name}\b", section), f"README's {mode} section lacks {name}"


def example_text(mode: str) -> str:
    return (REPO_ROOT / "configs" / f"{mode}.toml").read_text()


def example_keys(mode: str) -> tuple[dict[str, object], set[str]]:
    """configs/<mode>.toml: its settings, and the options it shows commented out."""
    text = example_text(mode)
    commented = set()
    in_table = False
    for line in text.splitlines():
        header = re.match(r"#? ?\[\[?([a-z_]+)\]\]?", line)
        if header:
            in_table = True
            if line.startswith("#"):
                commented.add(header.group(1))
            continue
        key = re.match(r"# ?([a-z_]+) = ", line)
        if key and not in_table:
            commented.add(key.group(1))
    return tomllib.loads(text), commented


@pytest.mark.parametrize("mode", MODES)
def test_example_config_shows_every_option_with_its_default(mode: str, tmp_path: Path) -> None:
    settings, commented = example_keys(mode)
    expected = {name for name, opt in declarations().items() if mode in opt.modes}
    assert set(settings) | commented == expected
    path = REPO_ROOT / "configs" / f"{mode}.toml"
    cfg = load_config(str(path), etc_path=str(tmp_path / "none"), environ={})
    for name in set(settings) - REQUIRED:
        opt = declarations()[name]
        if getattr(cfg, name) != opt.default_for(mode):
            # another value, for the example's sake: the comment above it gives the default
            comment = example_text(mode).split(f"\n{name} = ", 1)[0].rsplit("\n\n", 1)[-1]
            assert "default" in comment and opt.shown(mode) in comment, (name, opt.shown(mode))


@pytest.mark.parametrize("mode", MODES)
def test_every_declared_option_is_accepted_in_every_mode(mode: str, tmp_path: Path) -> None:
    """One /etc file serves every component: another mode's options load, unused."""
    lines = [f'mode = "{mode}"', 'kafka_topics = ["metrics"]']
    lines += ['[[rule]]\ntype = "basic"\nmatch = "cpu"\nsubject = "system"'] * (mode == "filter")
    for name, opt in declarations().items():
        if mode not in opt.modes and opt.kind in ("str", "int", "bool", "size", "duration"):
            lines.insert(1, f"{name} = {opt.shown(mode)}")
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    cfg = load_config(str(path), etc_path=str(tmp_path / "none"), environ={})
    assert cfg.mode == mode


def test_the_typed_config_for_mypy_has_every_mode() -> None:
    """mypy's Config (a TYPE_CHECKING block in config.py) names each mode's Options."""
    source = (REPO_ROOT / "influx_spout" / "config.py").read_text()
    bases = source.split("    class Config(\n", 1)[1].split("):", 1)[0]
    named = [name.removesuffix("_mode") for name in re.findall(r"(\w+)\.Options", bases)]
    assert named == list(MODES)
