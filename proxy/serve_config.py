"""Options of `mongoveil serve` from the command line, the environment and a YAML file.

Every long option of the `serve` sub-parser, and every global option such as
`--log-level`, can be set in three places. A command-line flag wins over an
environment variable, which wins over the config file (`--config FILE`), which
wins over the option's default:

- config file key: the option name without the leading dashes, exactly as
  spelled (`listen`, `drain-timeout`, `tlsMode`);
- environment variable: `MONGOVEIL_` and the option name in upper snake case
  (`MONGOVEIL_LISTEN`, `MONGOVEIL_DRAIN_TIMEOUT`, `MONGOVEIL_TLS_MODE`).

Nothing here names an option: the settings are read off the parser, so an option
added to the sub-parser later is covered without a change. Values from the file
and the environment go through the option's own `type` and `choices`, so they
are checked like flags. Flags (store_true) take true/false, yes/no, on/off or 1/0.

How options given on the command line are distinguished from defaults: each option's default is
swapped for an `_Unset` marker while argparse parses, so any option still holding
the marker after parsing was not given. The marker prints as the real default,
so `--help` text with `%(default)s` stays correct.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.policy import PolicyError
from proxy.policy.yaml_file import read_policy_yaml

ENV_PREFIX = "MONGOVEIL_"
SERVE_COMMAND = "serve"
CONFIG_OPTION = "config"

_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})

# user:password@ in a URI; the password is masked before a value is shown in an error.
_URI_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")


@dataclass(frozen=True)
class Setting:
    """One option that the environment and the config file can set."""

    action: argparse.Action
    parser: argparse.ArgumentParser     # reports errors about this option
    name: str                           # long option name without dashes; the config-file key

    @property
    def env(self) -> str:
        return env_name(self.name)

    @property
    def flag(self) -> str:
        return f"--{self.name}"


class _Unset:
    """The default of an option while the command line is parsed; prints as the real default."""

    def __init__(self, default: object) -> None:
        self.default = default

    def __str__(self) -> str:
        return str(self.default)

    def __repr__(self) -> str:
        return repr(self.default)


def env_name(option: str) -> str:
    """Return the environment variable of an option: tlsCAFile -> MONGOVEIL_TLS_CA_FILE."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", option)
    words = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", words)
    return ENV_PREFIX + words.replace("-", "_").upper()


def serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Return the `serve` sub-parser of the `mongoveil` parser."""
    for action in parser._actions:      # argparse keeps sub-parsers only in this list
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[SERVE_COMMAND]
    raise LookupError("the parser has no sub-commands")


def settings_of(parser: argparse.ArgumentParser) -> tuple[list[Setting], list[Setting]]:
    """Return the global settings of `parser` and the settings of its `serve` sub-parser.

    Raises TypeError for an option whose action cannot take a value from text,
    so a developer who adds one learns it at once.
    """
    return _settings(parser), _settings(serve_parser(parser))


def _settings(parser: argparse.ArgumentParser) -> list[Setting]:
    settings = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                               argparse._SubParsersAction)):
            continue
        if action.default is argparse.SUPPRESS:
            continue
        long_names = [text for text in action.option_strings if text.startswith("--")]
        if not long_names:
            continue        # positional arguments and short-only options stay on the command line
        supported = isinstance(action, (argparse._StoreAction, argparse._StoreConstAction,
                                        argparse.BooleanOptionalAction))
        if not supported or action.nargs not in (None, 0):
            raise TypeError(f"option {long_names[0]} uses {type(action).__name__} with nargs "
                            f"{action.nargs!r}, which cannot be set from the environment or a "
                            "config file; use a single-value option or a flag")
        settings.append(Setting(action, parser, long_names[0][2:]))
    return settings


def serve_options_table(parser: argparse.ArgumentParser) -> str:
    """Return the text that lists the environment variable of each serve option."""
    global_settings, serve_settings = settings_of(parser)
    rows = [(setting.flag, setting.env) for setting in serve_settings + global_settings]
    width = max(len(flag) for flag, _ in rows) + 2
    lines = [
        "Every option except --config can also be set in the config file, as 'name: value'",
        "with the option name without the leading dashes (listen: 0.0.0.0:27117). Every",
        "option can be set in the environment. Precedence: command line, then environment,",
        "then config file, then the default. Flags take true or false in the file and the",
        "environment. Relative paths are relative to the working directory.",
        "",
        f"{'option':<{width}}environment variable",
    ]
    lines += [f"{flag:<{width}}{env}" for flag, env in rows]
    return "\n".join(lines) + "\n"


def describe_serve_options(parser: argparse.ArgumentParser) -> None:
    """Add the table of config keys and environment variables to `mongoveil serve --help`."""
    serve = serve_parser(parser)
    serve.epilog = serve_options_table(parser)
    serve.formatter_class = argparse.RawDescriptionHelpFormatter


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                       environ: Mapping[str, str] | None = None,
                       ) -> tuple[argparse.Namespace, list[str]]:
    """Parse `argv` and fill the options it leaves out from `environ` and the config file.

    Returns the namespace and warnings to log once logging is set up (names of
    MONGOVEIL_* variables that look like a misspelled option). On a bad value,
    an unknown config key or a missing required option, prints the error and
    exits with status 2, as argparse does.
    """
    environ = os.environ if environ is None else environ
    global_settings, serve_settings = settings_of(parser)
    all_settings = global_settings + serve_settings

    required = {id(setting.action): setting.action.required for setting in all_settings}
    defaults = {id(setting.action): setting.action.default for setting in all_settings}
    try:
        for setting in all_settings:
            setting.action.default = _Unset(setting.action.default)
            setting.action.required = False
        args = parser.parse_args(argv)
    finally:
        for setting in all_settings:
            setting.action.default = defaults[id(setting.action)]
            setting.action.required = required[id(setting.action)]

    active = global_settings + (serve_settings if args.command == SERVE_COMMAND else [])
    sources = _Sources(environ, parser)
    if args.command == SERVE_COMMAND:
        config = next(setting for setting in serve_settings if setting.name == CONFIG_OPTION)
        _fill(args, config, sources, required[id(config.action)])
        if args.config is not None:
            sources.load_file(Path(args.config), active, config.parser)

    for setting in active:
        _fill(args, setting, sources, required[id(setting.action)])
    return args, _misspelled_variables(environ, all_settings)


class _Sources:
    """The environment and the loaded config file, read for options the command line left out."""

    def __init__(self, environ: Mapping[str, str], parser: argparse.ArgumentParser) -> None:
        self.environ = environ
        self.parser = parser
        self.file: Path | None = None
        self.values: dict[str, object] = {}

    def load_file(self, path: Path, settings: list[Setting],
                  serve: argparse.ArgumentParser) -> None:
        self.file = path
        self.values = read_config_file(path, [setting.name for setting in settings], serve)


def read_config_file(path: Path, names: Sequence[str],
                     parser: argparse.ArgumentParser) -> dict[str, object]:
    """Read the YAML mapping of option names to values in `path`; exit 2 on any fault."""
    def fail(problem: str) -> None:
        parser.error(f"config file {path}: {problem}")

    if not path.exists():
        fail("file not found; check the path given with --config or "
             f"{env_name(CONFIG_OPTION)}")
    if not path.is_file():
        fail("not a regular file; --config takes a YAML file")
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        fail(f"cannot be read: {error.strerror}")
    try:
        content = read_policy_yaml(path)
    except PolicyError as error:
        fail(f"{error.where + ': ' if error.where else ''}{error.problem}")

    if content is None:
        return {}       # an empty file sets nothing
    if not isinstance(content, dict):
        fail(f"expected a mapping of option names to values, got a YAML "
             f"{_yaml_type(content)}; write one 'name: value' line per option")

    for key in content:
        if key == CONFIG_OPTION:
            fail(f"key '{CONFIG_OPTION}' is not allowed in a config file; pass --config on the "
                 f"command line or set {env_name(CONFIG_OPTION)}")
        if not isinstance(key, str) or key not in names:
            fail(f"unknown key {key!r}{_suggestion(str(key), names)}; the keys are the long "
                 "option names of `mongoveil serve --help` without the leading dashes")
    return content


def _fill(args: argparse.Namespace, setting: Setting, sources: _Sources,
          required: bool) -> None:
    """Set one option that the command line left out: environment, config file, default."""
    value = getattr(args, setting.action.dest)
    if not isinstance(value, _Unset):
        return

    raw = sources.environ.get(setting.env)
    if raw is not None:
        where = f"environment variable {setting.env}"
        value = _from_text(setting, raw, where, fix="set it to a valid value or unset it")
    elif setting.name in sources.values:
        where = f"config file {sources.file}, key '{setting.name}'"
        value = _from_yaml(setting, sources.values[setting.name], where)
    elif required:
        metavar = setting.action.metavar or setting.action.dest.upper()
        setting.parser.error(f"missing {setting.flag}: pass {setting.flag} {metavar}, set "
                             f"{setting.env}, or add '{setting.name}:' to the config file "
                             "given with --config")
    else:
        value = value.default
        if isinstance(value, str) and setting.action.type is not None:
            value = setting.action.type(value)      # argparse converts a text default too
    setattr(args, setting.action.dest, value)


def _from_yaml(setting: Setting, value: object, where: str) -> object:
    """Convert a config-file value with the option's type; exit 2 when it does not fit."""
    fix = "fix the value or remove the key"
    if value is None:
        setting.parser.error(f"{where}: no value; give one or remove the key")
    if _takes_flag(setting.action):
        if not isinstance(value, bool):
            setting.parser.error(f"{where}: expected true or false, got {_shown(value)}; {fix}")
        return _flag_value(setting.action, value)

    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        setting.parser.error(
            f"{where}: expected text or a number, got a YAML {_yaml_type(value)} "
            f"{_shown(value)}; {fix} (quote words such as 'on' or 'no' that YAML reads as "
            "true or false)")
    return _from_text(setting, str(value), where, fix=fix)


def _from_text(setting: Setting, text: str, where: str, *, fix: str) -> object:
    """Convert text from the environment or the file as argparse converts a flag's value."""
    action = setting.action
    if text == "":
        setting.parser.error(f"{where}: empty value; {fix}")
    if _takes_flag(action):
        word = text.strip().lower()
        if word not in _TRUE_WORDS | _FALSE_WORDS:
            setting.parser.error(f"{where}: expected true or false (also yes/no, on/off, 1/0), "
                                 f"got {_shown(text)}; {fix}")
        return _flag_value(action, word in _TRUE_WORDS)

    value: object = text
    if action.type is not None:
        try:
            value = action.type(text)
        except argparse.ArgumentTypeError as error:
            setting.parser.error(f"{where}: {_masked(str(error))}; {fix}")
        except (TypeError, ValueError):
            type_name = getattr(action.type, "__name__", repr(action.type))
            setting.parser.error(f"{where}: invalid {type_name} value {_shown(text)}; {fix}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(str(choice) for choice in action.choices)
        setting.parser.error(f"{where}: invalid choice {_shown(text)}, expected one of "
                             f"{choices}; {fix}")
    return value


def _takes_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreConstAction, argparse.BooleanOptionalAction))


def _flag_value(action: argparse.Action, given: bool) -> object:
    """Return what the option holds when its flag is given (`given`) or left out."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return given
    return action.const if given else action.default


def _misspelled_variables(environ: Mapping[str, str], settings: list[Setting]) -> list[str]:
    """Warn about MONGOVEIL_* variables that are close to an option's variable but not one.

    Other MONGOVEIL_* names are left alone: a policy may read its master key from
    any variable, MONGOVEIL_MASTER_KEY for example.
    """
    known = [setting.env for setting in settings]
    warnings = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        if close:
            warnings.append(f"environment variable {name} is not an option of mongoveil and is "
                            f"ignored; did you mean {close[0]}?")
    return warnings


def _suggestion(key: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _yaml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def _shown(value: object) -> str:
    """Show a value in an error, with the password of a URI masked."""
    return _masked(repr(value))


def _masked(text: str) -> str:
    return _URI_PASSWORD.sub(r"\1***@", text)
