"""Options of `mongoveil serve` from flags, MONGOVEIL_* variables and the --config file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from proxy import cli
from proxy.serve_config import (
    describe_serve_options,
    env_name,
    parse_command_line,
    serve_parser,
    settings_of,
)

UPSTREAM = "mongodb://127.0.0.1:27017"
BASE_ENV = {"MONGOVEIL_UPSTREAM": UPSTREAM, "MONGOVEIL_POLICY": "policy.yaml"}


def parse(argv: list[str], environ: dict[str, str] | None = None,
          parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    args, _ = parse_command_line(parser or cli._build_parser(), argv,
                                 BASE_ENV if environ is None else environ)
    return args


def parse_error(capsys, argv: list[str], environ: dict[str, str] | None = None,
                parser: argparse.ArgumentParser | None = None) -> str:
    """Parse, expect argparse's exit status 2, and return the error line."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv, environ, parser)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return path


def parser_with_test_options() -> argparse.ArgumentParser:
    """The real parser plus options of each kind, as another module might add them later."""
    parser = cli._build_parser()
    serve = serve_parser(parser)
    serve.add_argument("--test-count", type=int, default=7,
                       help="a number (default: %(default)s)")
    serve.add_argument("--testAllowAll", action="store_true", help="a flag (default: off)")
    serve.add_argument("--test-mode", choices=["one", "two"], default="one",
                       help="a choice (default: one)")
    serve.add_argument("--test-switch", action=argparse.BooleanOptionalAction, default=True,
                       help="a switch (default: on)")
    return parser


# -- names ------------------------------------------------------------------------------


@pytest.mark.parametrize("option, variable", [
    ("listen", "MONGOVEIL_LISTEN"),
    ("policy-poll", "MONGOVEIL_POLICY_POLL"),
    ("metrics-listen", "MONGOVEIL_METRICS_LISTEN"),
    ("tlsMode", "MONGOVEIL_TLS_MODE"),
    ("tlsCAFile", "MONGOVEIL_TLS_CA_FILE"),
    ("tlsCertificateKeyFile", "MONGOVEIL_TLS_CERTIFICATE_KEY_FILE"),
    ("tlsAllowConnectionsWithoutCertificates",
     "MONGOVEIL_TLS_ALLOW_CONNECTIONS_WITHOUT_CERTIFICATES"),
])
def test_env_name_upper_snake_case(option, variable):
    assert env_name(option) == variable


def test_every_serve_option_has_a_setting():
    parser = cli._build_parser()
    global_settings, serve_settings = settings_of(parser)
    long_options = {text[2:] for action in serve_parser(parser)._actions
                    for text in action.option_strings if text.startswith("--") and text != "--help"}

    global_names = {setting.name for setting in global_settings}

    # The logging options after `serve` are the global settings, spelled later.
    assert {setting.name for setting in serve_settings} == long_options - global_names
    assert global_names >= {"log-level", "log-format"}


@pytest.mark.parametrize("argv", [
    ["--log-format", "json", "serve"],
    ["serve", "--log-format", "json"],
    ["--log-format", "text", "serve", "--log-format", "json"],
])
def test_log_format_before_or_after_serve(argv):
    assert parse(argv).log_format == "json"


def test_log_format_after_serve_overrides_environment():
    assert parse(["serve", "--log-format", "text"], {**BASE_ENV, "MONGOVEIL_LOG_FORMAT": "json"}).log_format == "text"


def test_log_format_from_environment_without_flag():
    assert parse(["serve"], {**BASE_ENV, "MONGOVEIL_LOG_FORMAT": "json"}).log_format == "json"


# -- precedence -------------------------------------------------------------------------


def test_defaults_without_file_or_env():
    args = parse(["serve"])

    assert args.listen == ("127.0.0.1", 27117)
    assert args.drain_timeout == 30.0
    assert args.max_connections == 10000
    assert args.idle_timeout == 0.0
    assert args.log_format == "text"
    assert args.config is None


def test_upstream_from_env_as_before():
    args = parse(["serve", "--policy", "p.yaml"], {"MONGOVEIL_UPSTREAM": UPSTREAM})

    assert args.upstream == UPSTREAM
    assert args.policy == Path("p.yaml")


def test_file_value_over_default(tmp_path):
    config = write_config(tmp_path, "listen: 0.0.0.0:27018\ndrain-timeout: 5\n"
                                    "max-connections: 20\nlog-format: json\n")

    args = parse(["serve", "--config", str(config)])

    assert args.listen == ("0.0.0.0", 27018)
    assert args.drain_timeout == 5.0
    assert args.max_connections == 20
    assert args.log_format == "json"


def test_env_over_file(tmp_path):
    config = write_config(tmp_path, "drain-timeout: 5\nlisten: 0.0.0.0:27018\n")
    environ = {**BASE_ENV, "MONGOVEIL_DRAIN_TIMEOUT": "9"}

    args = parse(["serve", "--config", str(config)], environ)

    assert args.drain_timeout == 9.0
    assert args.listen == ("0.0.0.0", 27018)


def test_flag_over_env_and_file(tmp_path):
    config = write_config(tmp_path, "drain-timeout: 5\n")
    environ = {**BASE_ENV, "MONGOVEIL_DRAIN_TIMEOUT": "9"}

    args = parse(["serve", "--config", str(config), "--drain-timeout", "1.5"], environ)

    assert args.drain_timeout == 1.5


def test_flag_equal_to_default_still_wins(tmp_path):
    # A flag that repeats the default is still a flag: it beats the file.
    config = write_config(tmp_path, "max-connections: 3\n")

    args = parse(["serve", "--config", str(config), "--max-connections", "10000"])

    assert args.max_connections == 10000


def test_config_path_from_env(tmp_path):
    config = write_config(tmp_path, "idle-timeout: 60\n")

    args = parse(["serve"], {**BASE_ENV, "MONGOVEIL_CONFIG": str(config)})

    assert args.idle_timeout == 60.0


def test_required_options_from_file(tmp_path):
    config = write_config(tmp_path, f"upstream: {UPSTREAM}\npolicy: /etc/mongoveil/policy.yaml\n")

    args = parse(["serve", "--config", str(config)], {})

    assert args.upstream == UPSTREAM
    assert args.policy == Path("/etc/mongoveil/policy.yaml")


def test_global_option_from_env_before_command():
    args = parse(["--log-level", "DEBUG", "serve"], {**BASE_ENV, "MONGOVEIL_LOG_LEVEL": "ERROR",
                                                      "MONGOVEIL_LOG_FORMAT": "json"})

    assert args.log_level == "DEBUG"
    assert args.log_format == "json"


def test_env_of_other_commands_ignores_serve_options():
    args = parse(["policy", "check", "p.yaml"], {"MONGOVEIL_LOG_FORMAT": "json",
                                                  "MONGOVEIL_DRAIN_TIMEOUT": "not checked"})

    assert args.log_format == "json"
    assert not hasattr(args, "drain_timeout")


def test_empty_file_sets_nothing(tmp_path):
    config = write_config(tmp_path, "# nothing yet\n")

    args = parse(["serve", "--config", str(config)])

    assert args.drain_timeout == 30.0


def test_parser_unchanged_after_parse():
    parser = cli._build_parser()
    serve = serve_parser(parser)
    before = [(action.dest, action.default, action.required) for action in serve._actions]

    parse(["serve"], parser=parser)

    assert [(action.dest, action.default, action.required) for action in serve._actions] == before


# -- options added later ----------------------------------------------------------------


def test_added_options_from_file(tmp_path):
    config = write_config(tmp_path, "test-count: 3\ntestAllowAll: true\ntest-mode: two\n"
                                    "test-switch: false\n")

    args = parse(["serve", "--config", str(config)], parser=parser_with_test_options())

    assert args.test_count == 3
    assert args.testAllowAll is True
    assert args.test_mode == "two"
    assert args.test_switch is False


def test_added_options_from_env():
    environ = {**BASE_ENV, "MONGOVEIL_TEST_COUNT": "4", "MONGOVEIL_TEST_ALLOW_ALL": "yes",
               "MONGOVEIL_TEST_MODE": "two", "MONGOVEIL_TEST_SWITCH": "off"}

    args = parse(["serve"], environ, parser=parser_with_test_options())

    assert args.test_count == 4
    assert args.testAllowAll is True
    assert args.test_mode == "two"
    assert args.test_switch is False


def test_added_options_defaults():
    args = parse(["serve"], parser=parser_with_test_options())

    assert args.test_count == 7
    assert args.testAllowAll is False
    assert args.test_mode == "one"
    assert args.test_switch is True


def test_added_flag_false_in_env_over_file(tmp_path):
    config = write_config(tmp_path, "testAllowAll: true\n")
    environ = {**BASE_ENV, "MONGOVEIL_TEST_ALLOW_ALL": "false"}

    args = parse(["serve", "--config", str(config)], environ, parser=parser_with_test_options())

    assert args.testAllowAll is False


def test_added_flag_on_command_line_over_env():
    environ = {**BASE_ENV, "MONGOVEIL_TEST_ALLOW_ALL": "false", "MONGOVEIL_TEST_SWITCH": "false"}

    args = parse(["serve", "--testAllowAll", "--test-switch"], environ,
                 parser=parser_with_test_options())

    assert args.testAllowAll is True
    assert args.test_switch is True


def test_unsupported_action_raises_type_error():
    parser = cli._build_parser()
    serve_parser(parser).add_argument("--test-many", action="append", help="several values")

    with pytest.raises(TypeError, match="--test-many"):
        settings_of(parser)


# -- errors -----------------------------------------------------------------------------


def test_missing_required_names_all_sources(capsys):
    error = parse_error(capsys, ["serve"], {"MONGOVEIL_UPSTREAM": UPSTREAM})

    assert "missing --policy" in error
    assert "MONGOVEIL_POLICY" in error
    assert "'policy:'" in error


def test_unknown_key_suggests_option(tmp_path, capsys):
    config = write_config(tmp_path, "listn: 0.0.0.0:1\n")

    error = parse_error(capsys, ["serve", "--config", str(config)])

    assert f"config file {config}" in error
    assert "unknown key 'listn'" in error
    assert "did you mean 'listen'?" in error


def test_non_string_key_rejected(tmp_path, capsys):
    config = write_config(tmp_path, "1: x\n")

    error = parse_error(capsys, ["serve", "--config", str(config)])

    assert "unknown key 1" in error


def test_config_key_in_file_rejected(tmp_path, capsys):
    config = write_config(tmp_path, "config: other.yaml\n")

    error = parse_error(capsys, ["serve", "--config", str(config)])

    assert "key 'config' is not allowed" in error
    assert "MONGOVEIL_CONFIG" in error


@pytest.mark.parametrize("text, expected", [
    ("drain-timeout: soon\n", "key 'drain-timeout': expected a number of seconds, got 'soon'"),
    ("drain-timeout: -1\n", "key 'drain-timeout': expected 0 or a positive number of seconds"),
    ("drain-timeout: true\n", "key 'drain-timeout': expected text or a number, got a YAML "
                              "boolean"),
    ("max-connections: 2.5\n", "key 'max-connections': expected a whole number, got '2.5'"),
    ("listen: [a, b]\n", "key 'listen': expected text or a number, got a YAML list"),
    ("listen: {host: a}\n", "key 'listen': expected text or a number, got a YAML mapping"),
    ("listen: nowhere\n", "key 'listen': expected HOST:PORT, got 'nowhere'"),
    ("listen: ''\n", "key 'listen': empty value"),
    ("log-format: xml\n", "key 'log-format': invalid choice 'xml', expected one of text, json"),
])
def test_wrong_value_in_file(tmp_path, capsys, text, expected):
    config = write_config(tmp_path, text)

    error = parse_error(capsys, ["serve", "--config", str(config)])

    assert expected in error
    assert "fix the value or remove the key" in error


def test_null_value_in_file(tmp_path, capsys):
    config = write_config(tmp_path, "listen:\n")

    error = parse_error(capsys, ["serve", "--config", str(config)])

    assert "key 'listen': no value; give one or remove the key" in error


def test_flag_in_file_needs_boolean(tmp_path, capsys):
    config = write_config(tmp_path, "testAllowAll: 'maybe'\n")

    error = parse_error(capsys, ["serve", "--config", str(config)],
                        parser=parser_with_test_options())

    assert "key 'testAllowAll': expected true or false, got 'maybe'" in error


@pytest.mark.parametrize("variable, value, expected", [
    ("MONGOVEIL_DRAIN_TIMEOUT", "abc", "expected a number of seconds, got 'abc'"),
    ("MONGOVEIL_MAX_CONNECTIONS", "-3", "expected 0 or a positive whole number, got '-3'"),
    ("MONGOVEIL_IDLE_TIMEOUT", "inf", "expected 0 or a positive number of seconds"),
    ("MONGOVEIL_LISTEN", "27117", "expected HOST:PORT, got '27117'"),
    ("MONGOVEIL_LOG_FORMAT", "yaml", "invalid choice 'yaml', expected one of text, json"),
    ("MONGOVEIL_LOG_LEVEL", "debug", "invalid choice 'debug'"),
    ("MONGOVEIL_POLICY_POLL", "", "empty value"),
])
def test_bad_env_value(capsys, variable, value, expected):
    error = parse_error(capsys, ["serve"], {**BASE_ENV, variable: value})

    assert f"environment variable {variable}: " in error
    assert expected in error
    assert "set it to a valid value or unset it" in error


def test_bad_env_flag_word(capsys):
    error = parse_error(capsys, ["serve"], {**BASE_ENV, "MONGOVEIL_TEST_ALLOW_ALL": "sure"},
                        parser=parser_with_test_options())

    assert "environment variable MONGOVEIL_TEST_ALLOW_ALL: expected true or false" in error


def test_bad_env_value_masks_uri_password(capsys):
    error = parse_error(capsys, ["serve"], {**BASE_ENV, "MONGOVEIL_MAX_CONNECTIONS":
                                            "mongodb://app:s3cret@db:1"})

    assert "s3cret" not in error
    assert "app:***@" in error


def test_bad_env_value_ignored_under_flag(capsys):
    # The command line wins, so a bad variable under a flag is never read.
    args = parse(["serve", "--drain-timeout", "2"], {**BASE_ENV, "MONGOVEIL_DRAIN_TIMEOUT": "x"})

    assert args.drain_timeout == 2.0


def test_missing_config_file(tmp_path, capsys):
    error = parse_error(capsys, ["serve", "--config", str(tmp_path / "absent.yaml")])

    assert "absent.yaml: file not found" in error
    assert "MONGOVEIL_CONFIG" in error


def test_config_file_is_directory(tmp_path, capsys):
    error = parse_error(capsys, ["serve", "--config", str(tmp_path)])

    assert "not a regular file" in error


def test_config_file_invalid_yaml(tmp_path, capsys):
    config = write_config(tmp_path, "listen: [unclosed\n")

    error = parse_error(capsys, ["serve", "--config", str(config)])

    assert f"config file {config}: line " in error
    assert "invalid YAML" in error


def test_config_file_duplicate_key(tmp_path, capsys):
    config = write_config(tmp_path, "listen: a:1\nlisten: b:2\n")

    error = parse_error(capsys, ["serve", "--config", str(config)])

    assert "duplicate key 'listen'" in error


def test_config_file_not_mapping(tmp_path, capsys):
    config = write_config(tmp_path, "- listen\n- policy\n")

    error = parse_error(capsys, ["serve", "--config", str(config)])

    assert "expected a mapping of option names to values, got a YAML list" in error


def test_misspelled_variable_warns():
    environ = {**BASE_ENV, "MONGOVEIL_DRAIN_TIMOUT": "5", "MONGOVEIL_MASTER_KEY": "k"}

    _, warnings = parse_command_line(cli._build_parser(), ["serve"], environ)

    assert len(warnings) == 1
    assert "MONGOVEIL_DRAIN_TIMOUT" in warnings[0]
    assert "did you mean MONGOVEIL_DRAIN_TIMEOUT?" in warnings[0]


# -- help -------------------------------------------------------------------------------


def test_every_serve_option_documents_default():
    for action in serve_parser(cli._build_parser())._actions:
        if action.option_strings == ["-h", "--help"]:
            continue
        assert action.help, action.option_strings
        assert "default" in action.help or "required" in action.help, action.option_strings


def test_help_lists_config_keys_and_variables(capsys):
    parser = parser_with_test_options()
    describe_serve_options(parser)

    with pytest.raises(SystemExit) as exit_info:
        parse(["serve", "--help"], parser=parser)

    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for setting in settings_of(parser)[1]:
        assert setting.env in text
    assert "MONGOVEIL_LOG_FORMAT" in text
    assert "a number (default: 7)" in text      # %(default)s shows the real default


def test_workers_above_four_per_core_rejected(capsys):
    limit = 4 * len(os.sched_getaffinity(0))

    message = parse_error(capsys, ["serve", "--workers", str(limit + 1)])

    assert f"expected at most {limit}" in message


def test_workers_at_four_per_core_accepted():
    limit = 4 * len(os.sched_getaffinity(0))

    assert parse(["serve", "--workers", str(limit)]).workers == limit
