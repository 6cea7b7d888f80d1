"""Checks of the command line before Hydra runs anything: every Hydra-level mistake in one line, exit 2.

Hydra reports these with multi-line dumps and exit 1, and some only after it has created the run
directory. ``train.py`` calls :func:`check_cli_overrides_or_exit` first:

* an unknown group option (``routing=foo``): ``error: routing: routing=foo is not an option; use one of ...``;
* an override Hydra cannot parse (unquoted non-ASCII text, an unclosed bracket): the argument and
  how to quote it;
* an unknown key (``model.foo=1``, the typo ``expert=8``), a ``+`` on an existing key, a ``~`` on a
  missing one: the key and a did-you-mean from the keys the composed config has (``experts``);
* ``task_name=../../x``: refused before Hydra creates a directory from it;
* in a sweep (``-m``), a config error that every job would hit (``trainer.val_check_interval=500
  trainer.max_steps=100``) is reported once, before any job starts; an error of only some jobs
  stays theirs (the sweep runs the others and lists it at the end).

``--help``, ``--hydra-help``, ``--info``, ``--version`` and shell completion (``-sc``) are left to
Hydra untouched. Composing costs about a quarter of a second; a sweep composes and validates jobs
only until one passes.

Imports: hydra, :mod:`sectional_moe.errors`, :mod:`sectional_moe.training.validate` (torch-free at
import: it runs before ``--help``; validating a sweep's jobs asks torch whether CUDA exists).
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from hydra.core.override_parser.overrides_parser import OverridesParser

from sectional_moe.errors import ConfigError

# Hydra flags whose next argument is a value, not an override
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--info", "--experimental-rerun"}
# flags that add config sources we cannot see from conf/: the check then steps aside
_EXTRA_SEARCH_PATH = {"--config-dir", "-cd", "--config-path", "-cp"}
# flags that make Hydra print something instead of running: left to Hydra untouched
_NOT_A_RUN = {"--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc"}
_MULTIRUN = {"--multirun", "-m"}


def check_cli_overrides(argv: list[str], conf_dir: str | Path) -> None:
    """Name an unknown config-group option (``routing=foo``, ``size=huge``) in one line.

    Hydra's own error for these is a multi-line search-path dump. Only groups that are folders of
    ``conf_dir`` are checked (``hydra/*`` plugins and ``+group`` additions are left to Hydra).

    Raises:
        ConfigError: ``group: group=option is not an option; use one of ...``.
    """
    conf_dir = Path(conf_dir)
    args, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg.split("=", 1)[0] in _EXTRA_SEARCH_PATH or arg.startswith("hydra.searchpath"):
            return
        if arg.startswith("-"):
            skip_next = arg in _FLAGS_WITH_VALUE and "=" not in arg
            continue
        args.append(arg)
    parser = OverridesParser.create()
    for arg in args:
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:  # noqa: BLE001 - a syntax error is Hydra's to report
            continue
        group = override.key_or_group
        if override.is_delete() or override.is_add() or group.startswith("hydra") or not (conf_dir / group).is_dir():
            continue
        if override.is_sweep_override():
            values: list[Any] = list(override.sweep_string_iterator())
        else:
            value = override.value()
            values = list(value) if isinstance(value, list) else [value]
        options = sorted(str(p.relative_to(conf_dir / group).with_suffix("")) for p in (conf_dir / group).rglob("*.yaml"))
        for value in values:
            if value is None or str(value) == "null":
                continue
            if not (conf_dir / group / f"{value}.yaml").is_file():
                raise ConfigError(group, f"{group}={value} is not an option; use one of {', '.join(options) or '(none: conf/' + group + '/ is empty)'}")


def check_cli_overrides_or_exit(argv: list[str], conf_dir: str | Path) -> None:
    """:func:`check_cli_overrides` then :func:`check_composition`, printing ``error: <key>: ...``
    and exiting 2 on the first problem."""
    try:
        check_cli_overrides(argv, conf_dir)
        check_composition(argv, conf_dir)
    except ConfigError as err:
        from sectional_moe.secrets import redact_message

        print(f"error: {redact_message(str(err))}", file=sys.stderr, flush=True)
        sys.exit(2)


def split_argv(argv: list[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """(flags, overrides, flag values) of a ``train.py`` command line."""
    flags: list[str] = []
    overrides: list[str] = []
    values: dict[str, str] = {}
    skip_for: str | None = None
    for arg in argv:
        if skip_for is not None:
            values[skip_for] = arg
            skip_for = None
            continue
        if arg.startswith("-"):
            name, eq, value = arg.partition("=")
            flags.append(name)
            if eq:
                values[name] = value
            elif name in _FLAGS_WITH_VALUE or name in _EXTRA_SEARCH_PATH or name in ("--shell-completion", "-sc"):
                skip_for = name
            continue
        overrides.append(arg)
    return flags, overrides, values


def _key_of(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~").strip() or arg


def check_parsable(overrides: list[str]) -> None:
    """Every override parses by Hydra's grammar.

    Raises:
        ConfigError: ``<key>: <arg> cannot be parsed as an override (...); quote the value ...``.
    """
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in overrides:
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as err:
            key, _, value = arg.partition("=")
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            non_ascii = any(ord(c) > 127 for c in value)
            why = "text with non-ASCII characters" if non_ascii else "this value"
            raise ConfigError(_key_of(arg), f"{arg!r} cannot be parsed as an override ({first.split(':')[0]}); Hydra needs "
                              f"{why} quoted, e.g. '{key}=\"{value}\"' (single quotes around the whole argument for the shell)") from None


def known_keys(cfg: Any, conf_dir: Path) -> list[str]:
    """Every dotted key of a composed config (and every prefix), plus the config groups."""
    from omegaconf import OmegaConf

    out: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                name = f"{prefix}{k}"
                out.add(name)
                walk(v, name + ".")

    container = OmegaConf.to_container(cfg, resolve=False)
    if isinstance(container, dict):
        container.pop("hydra", None)
        walk(container, "")
    out.update(p.name for p in conf_dir.iterdir() if p.is_dir())
    return sorted(out)


def did_you_mean(key: str, known: Iterable[str]) -> str | None:
    """The known key closest to a mistyped one (``expert`` -> ``experts``, ``trainer.max_step`` ->
    ``trainer.max_steps``), or None. Keys under the same parent are compared by their last part."""
    known = list(known)
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if match:
        return siblings[match[0]]
    if parent:  # the right name under another parent: trainer.lr -> optim.lr
        leaves: dict[str, str] = {}
        for k in known:
            leaves.setdefault(k.rpartition(".")[2], k)
        match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)
        if match and leaves[match[0]] != parent:
            return leaves[match[0]]
    return None


_COULD_NOT_OVERRIDE = re.compile(r"Could not override '([^']+)'")
_ALREADY_AT = re.compile(r"An item is already at '([^']+)'")
_DOES_NOT_EXIST = re.compile(r"Could not delete from config\. '([^']+)' does not exist")


def composition_error(err: BaseException, overrides: list[str], known: list[str]) -> ConfigError:
    """Hydra's composition error as our one line, with a did-you-mean for an unknown key."""
    text = str(err)
    first = " ".join(text.split())[:200]
    if m := _COULD_NOT_OVERRIDE.search(text):
        key = m.group(1)
        value = next((o.split("=", 1)[1] for o in overrides if _key_of(o) == key and "=" in o), "...")
        hint = did_you_mean(key, known)
        mean = f"; did you mean {hint}={value}?" if hint else ""
        return ConfigError(key, f"{key} is not a config key{mean} (`python train.py --cfg job` lists them; +{key}={value} adds a new one)")
    if m := _ALREADY_AT.search(text):
        key = m.group(1)
        value = next((o.split("=", 1)[1] for o in overrides if _key_of(o) == key and "=" in o), "...")
        return ConfigError(key, f"+{key} adds a key, but {key} exists already; set it without the +: {key}={value}")
    if m := _DOES_NOT_EXIST.search(text):
        key = m.group(1)
        hint = did_you_mean(key, known)
        return ConfigError(key, f"~{key} removes a key that does not exist" + (f"; did you mean ~{hint}?" if hint else ""))
    if m := re.search(r"Could not delete '([^']+)'\. No match in the defaults list", text):
        key = m.group(1)
        return ConfigError(key, f"~{key} matches nothing in the defaults list (a group chosen as a list cannot be removed "
                           f"that way); choose an option instead, e.g. {key}=none")
    if "Config group override must be a string or a list" in text:  # group=null
        key = next((_key_of(o) for o in overrides if o.split("=", 1)[-1].strip().lower() in ("null", "none", "~")), "overrides")
        return ConfigError(key, f"{key}=null: a config group cannot be set to null on the command line; drop the override "
                           f"(or remove the group with ~{key})")
    key = next((_key_of(o) for o in overrides if _key_of(o) in text), "overrides")
    return ConfigError(key, f"Hydra cannot compose the config: {first}")


def check_task_name_override(overrides: list[str]) -> None:
    """``task_name`` on the command line names one folder (Hydra would create ``../../x`` before we run)."""
    from sectional_moe.training.validate import check_task_name

    parser = OverridesParser.create()
    for arg in overrides:
        if _key_of(arg) != "task_name":
            continue
        (override,) = parser.parse_overrides([arg])
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            check_task_name(value)


def check_composition(argv: list[str], conf_dir: str | Path, config_name: str = "train") -> None:
    """Compose the config of the command line (of each sweep job, until one validates) the way
    Hydra will, and turn anything that would stop Hydra, or every job, into one line. The
    ``${smoe.*}`` resolvers must be registered (``train.py`` does it first).

    Raises:
        ConfigError: see the module docstring.
    """
    conf_dir = Path(conf_dir)
    flags, overrides, values = split_argv(argv)
    if set(flags) & _NOT_A_RUN or set(flags) & _EXTRA_SEARCH_PATH or any(o.startswith("hydra.searchpath") for o in overrides):
        return
    config_name = values.get("--config-name", values.get("-cn", config_name))
    check_parsable(overrides)
    check_task_name_override(overrides)

    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    multirun = bool(set(flags) & _MULTIRUN)
    parsed = OverridesParser.create().parse_overrides(overrides)
    jobs = [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch] or [[]]
    if not multirun:
        sweep = next((o for o in parsed if o.is_sweep_override()), None)
        if sweep is not None:
            raise ConfigError(sweep.key_or_group, f"{sweep.input_line} is a sweep (several values); add -m to run one job per value, "
                              "or give one value")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            def compose_job(job: list[str]) -> Any:
                try:
                    return compose(config_name=config_name, overrides=job, return_hydra_config=True)
                except (HydraException, OmegaConfBaseException, ValueError) as err:
                    known: list[str] = []
                    for base in ([o for o in job if _key_of(o) not in str(err)], []):
                        try:
                            known = known_keys(compose(config_name=config_name, overrides=base), conf_dir)
                            break
                        except (HydraException, OmegaConfBaseException, ValueError):
                            continue
                    raise composition_error(err, [*overrides, *job], known) from None

            first = compose_job(jobs[0])
            if multirun and len(jobs) > 1:
                check_sweep(first, jobs, compose_job)
    finally:
        GlobalHydra.instance().clear()


def check_sweep(first: Any, jobs: list[list[str]], compose_job: Any) -> None:
    """Validate the sweep's jobs until one passes; if none does and all fail on the same key,
    that is a setting wrong for the whole sweep: raise it once, before any job starts."""
    from sectional_moe.training.validate import validate_config

    errors: list[ConfigError] = []
    for i, job in enumerate(jobs):
        cfg = first if i == 0 else compose_job(job)
        try:
            validate_config(cfg, check_device=False)  # devices are the jobs' (a login node has no GPU)
            return
        except ConfigError as err:
            errors.append(err)
        if len({e.key for e in errors}) > 1:
            return  # different jobs fail differently: each job reports its own
    err = errors[0]
    raise ConfigError(err.key, f"{err.message} (all {len(jobs)} jobs of this sweep; none was started)")
