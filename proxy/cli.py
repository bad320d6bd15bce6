"""The `mongoveil` command: serve, keys, migrate, policy check and the demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import uuid
from pathlib import Path

from proxy.session.compression import DEFAULT_COMPRESSORS

log = logging.getLogger("mongoveil")

DEFAULT_LISTEN = "127.0.0.1:27117"
DEFAULT_METRICS_LISTEN = "0.0.0.0:9216"


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _add_key_vault_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, type=Path, help="policy YAML file")
    parser.add_argument("--upstream", default=os.environ.get("MONGOVEIL_UPSTREAM"),
                        required="MONGOVEIL_UPSTREAM" not in os.environ,
                        help="MongoDB connection string with access to the key vault "
                             "(default: the MONGOVEIL_UPSTREAM environment variable)")


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def _non_negative_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected 0 or a positive number of seconds, "
                                         f"got {text!r}")
    return seconds


def _non_negative_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive whole number, got {text!r}")
    return number


def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {text!r}")
    return number


# Each worker is a whole proxy process (about 20 MB resident, measured here),
# and more workers than cores only add context switches, so four per usable
# core is plenty.
WORKERS_PER_CORE = 4


def _worker_count(text: str) -> int:
    """Parse --workers: 1 or more, and at most WORKERS_PER_CORE per core this process may use."""
    number = _positive_int(text)
    cores = len(os.sched_getaffinity(0))
    limit = WORKERS_PER_CORE * cores
    if number > limit:
        raise argparse.ArgumentTypeError(
            f"expected at most {limit} ({WORKERS_PER_CORE} per usable CPU core, and this "
            f"machine gives {cores}), got {text!r}")
    return number


def _metrics_listen(text: str) -> tuple[str, int] | None:
    """Parse --metrics-listen: HOST:PORT, or 'disabled' for None."""
    if text.strip().lower() == "disabled":
        return None
    try:
        return _host_port(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or 'disabled', got {text!r}") from None


def _namespace_list(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list of DB.COLL namespaces; empty text gives none."""
    namespaces = tuple(part.strip() for part in text.split(",") if part.strip())
    for namespace in namespaces:
        database, dot, collection = namespace.partition(".")
        if not database or not dot or not collection:
            raise argparse.ArgumentTypeError(f"expected DB.COLL namespaces separated by commas, "
                                             f"got {namespace!r}")
    return namespaces


def _add_yes_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", action="store_true",
                        help="do not ask for confirmation (required without a terminal)")


def _add_logging_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Add --log-level and --log-format, with their defaults or with none (argparse.SUPPRESS)."""
    parser.add_argument("--log-level", default="INFO" if defaults else argparse.SUPPRESS,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="minimum level of log lines written to stderr (default: INFO)")
    parser.add_argument("--log-format", default="text" if defaults else argparse.SUPPRESS,
                        choices=["text", "json"],
                        help="format of log lines: text, or json for one JSON object per line "
                             "with time, level, logger, message, and conn and peer on lines "
                             "about a client connection (default: text)")


class _CommandsWithLogging:
    """A sub-parser group whose commands, and their own commands, take the logging options."""

    def __init__(self, group, logging_options: argparse.ArgumentParser) -> None:
        self._group = group
        self._logging_options = logging_options

    def add_parser(self, name: str, **options) -> argparse.ArgumentParser:
        return self._group.add_parser(name, parents=[self._logging_options], **options)

    def add_subparsers(self, parser: argparse.ArgumentParser, **options) -> _CommandsWithLogging:
        return _CommandsWithLogging(parser.add_subparsers(**options), self._logging_options)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mongoveil",
        description="A MongoDB wire-protocol proxy that encrypts configured fields "
                    "and reveals them by role.",
    )
    _add_logging_options(parser, defaults=True)
    # The logging options are also accepted after a command's name (`mongoveil
    # serve --log-format json`). There they have no default, so the one before
    # the name, the environment or the config file still applies.
    logging_options = argparse.ArgumentParser(add_help=False)
    _add_logging_options(logging_options, defaults=False)
    commands = _CommandsWithLogging(parser.add_subparsers(dest="command", required=True),
                                    logging_options)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--listen", type=_host_port, default=DEFAULT_LISTEN, metavar="HOST:PORT",
                       help=f"HOST:PORT to accept MongoDB clients on (default: {DEFAULT_LISTEN})")
    serve.add_argument("--upstream", required=True, metavar="URI",
                       help="MongoDB connection string of the server; its credentials are "
                            "the proxy's own account for the key vault (required; prefer the "
                            "MONGOVEIL_UPSTREAM environment variable, which keeps the "
                            "password out of the process list)")
    serve.add_argument("--policy", required=True, type=Path, metavar="FILE",
                       help="policy YAML file (required)")
    serve.add_argument("--advertise", default=None, metavar="HOST:PORT",
                       help="HOST:PORT that `hello` replies name as the server (default: the "
                            "address each client connected to)")
    serve.add_argument("--policy-poll", type=_positive_seconds, default=2.0, metavar="SECONDS",
                       help="how often to check the policy file for changes and reload it "
                            "(seconds, default: 2); SIGHUP reloads at once")
    serve.add_argument("--compressors", default=",".join(DEFAULT_COMPRESSORS), metavar="LIST",
                       help="comma-separated compressors offered to clients, in order of "
                            "preference, or 'disabled' (default: "
                            f"{','.join(DEFAULT_COMPRESSORS)})")
    serve.add_argument("--config", type=Path, default=None, metavar="FILE",
                       help="YAML file of serve options, one 'name: value' line each, named "
                            "as the options below without the leading dashes; the command "
                            "line and MONGOVEIL_* variables override it (default: none)")
    serve.add_argument("--drain-timeout", type=_non_negative_seconds, default=30.0,
                       metavar="SECONDS",
                       help="on SIGTERM or SIGINT, how long requests in flight may run before "
                            "their connections are closed (seconds, default: 30)")
    serve.add_argument("--max-connections", type=_non_negative_int, default=10000, metavar="N",
                       help="maximum number of client connections open at once; more are "
                            "closed right after accept. Each one also opens an upstream "
                            "connection, so the process needs about 2 file descriptors per "
                            "connection (default: 10000; 0: no limit)")
    serve.add_argument("--idle-timeout", type=_non_negative_seconds, default=0.0,
                       metavar="SECONDS",
                       help="close a client connection that sends no request for this long "
                            "(seconds, default: 0, which keeps idle connections open)")
    serve.add_argument("--no-uvloop", action="store_true",
                       help="run on asyncio's own event loop even when uvloop is installed "
                            "(by default the proxy uses uvloop when it can import it)")
    serve.add_argument("--workers", type=_worker_count, default=1, metavar="N",
                       help="number of proxy processes that share the listening port "
                            "(SO_REUSEPORT, Linux), to use N cores, at most "
                            f"{WORKERS_PER_CORE} per usable core; with more than 1, a "
                            "supervisor process starts them again when they exit, and "
                            "--max-connections applies to each (default: 1)")
    # The TLS options keep mongod's names and meanings. --tlsMode is checked when
    # the proxy starts, so an invalid mode is reported in one line like a bad file.
    serve.add_argument("--tlsMode", default="disabled", metavar="MODE",
                       help="TLS for client connections, as in mongod: disabled, allowTLS or "
                            "preferTLS (TLS and plain clients on the same port), or "
                            "requireTLS; TLS 1.2 at least (default: disabled)")
    serve.add_argument("--tlsCertificateKeyFile", type=Path, default=None, metavar="FILE",
                       help="PEM file with the proxy's certificate (and chain) followed by its "
                            "unencrypted private key; required unless --tlsMode is disabled, "
                            "and read again on SIGHUP (default: none)")
    serve.add_argument("--tlsCAFile", type=Path, default=None, metavar="FILE",
                       help="PEM file of the CAs that client certificates must chain to; with "
                            "it, clients must present a certificate. Read again on SIGHUP "
                            "(default: none, no client certificates requested)")
    serve.add_argument("--tlsAllowConnectionsWithoutCertificates", action="store_true",
                       help="with --tlsCAFile, also accept clients that present no "
                            "certificate; a presented one is still verified "
                            "(default: off)")
    serve.add_argument("--metrics-listen", type=_metrics_listen, default=DEFAULT_METRICS_LISTEN,
                       metavar="HOST:PORT",
                       help="HTTP address of /metrics (Prometheus), /healthz and /readyz, or "
                            f"'disabled' (default: {DEFAULT_METRICS_LISTEN})")
    serve.add_argument("--metrics-namespaces", type=_namespace_list, default="",
                       metavar="LIST",
                       help="comma-separated DB.COLL namespaces whose requests are counted "
                            "with a namespace label in mongoveil_requests_total; requests on "
                            "other namespaces get none (default: none)")

    keys = commands.add_parser("keys", help="manage the master key and data keys")
    key_commands = commands.add_subparsers(keys, dest="keys_command", required=True)
    init = key_commands.add_parser(
        "init", help="create the master-key file if missing and the data key of every class")
    _add_key_vault_arguments(init)

    listing = key_commands.add_parser(
        "list", help="list the data keys of the key vault (never their key material)")
    _add_key_vault_arguments(listing)
    listing.add_argument("--json", action="store_true",
                         help="write one JSON object per key instead of a table")

    create = key_commands.add_parser(
        "create", help="create the data key of a class that has no active key")
    _add_key_vault_arguments(create)
    create.add_argument("--class", dest="class_name", required=True, metavar="NAME",
                        help="data class named in the policy")

    disable = key_commands.add_parser(
        "disable", help="mark a data key disabled: it stays readable but encrypts no new values")
    _add_key_vault_arguments(disable)
    target = disable.add_mutually_exclusive_group(required=True)
    target.add_argument("--id", dest="key_id", type=uuid.UUID, metavar="UUID",
                        help="id of the data key")
    target.add_argument("--class", dest="class_name", metavar="NAME",
                        help="data class whose active key to disable")
    _add_yes_argument(disable)

    rotate = key_commands.add_parser(
        "rotate", help="give a class a new data key; the old one keeps decrypting old values")
    _add_key_vault_arguments(rotate)
    rotate.add_argument("--class", dest="class_name", required=True, metavar="NAME",
                        help="data class named in the policy")
    _add_yes_argument(rotate)

    rewrap = key_commands.add_parser(
        "rewrap", help="wrap every data key with another master key; values are not touched")
    _add_key_vault_arguments(rewrap)
    rewrap.add_argument("--to-provider", dest="target", required=True, metavar="NAME",
                        help="name of the new master key under keys.master_keys in the policy")
    _add_yes_argument(rewrap)

    shred = key_commands.add_parser(
        "shred", help="delete one data subject's key: its values become unreadable for good")
    _add_key_vault_arguments(shred)
    shred.add_argument("--class", dest="class_name", required=True, metavar="NAME",
                       help="data class configured with key_per in the policy")
    subject = shred.add_mutually_exclusive_group(required=True)
    subject.add_argument("--subject", metavar="VALUE",
                         help="the subject's value in the key_per field, as a string")
    subject.add_argument("--subject-json", metavar="JSON",
                         help="the subject's value as MongoDB Extended JSON, for other types, "
                              "for example '{\"$numberInt\": \"42\"}'")
    shred.add_argument("--reason", metavar="TEXT",
                       help="why the key is shredded, for the audit record (no personal data)")
    shred.add_argument("--no-audit", action="store_true",
                       help="shred even though the policy configures no audit file")
    _add_yes_argument(shred)

    migrate = commands.add_parser(
        "migrate", help="encrypt the protected fields of an existing collection in place, and "
                        "re-encrypt values of rotated keys")
    _add_key_vault_arguments(migrate)
    migrate.add_argument("--namespace", required=True, metavar="DB.COLL",
                         help="collection to migrate, as named in the policy")
    migrate.add_argument("--batch-size", type=int, default=500, metavar="N",
                         help="documents read and written per batch (default: 500)")

    audit = commands.add_parser("audit", help="check the audit trail")
    audit_commands = commands.add_subparsers(audit, dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="check the hash chain and MACs of an audit file and report the first "
                       "broken record; the MAC key comes from the key vault")
    verify.add_argument("file", type=Path, help="JSON-lines audit file (audit.file)")
    _add_key_vault_arguments(verify)

    policy = commands.add_parser("policy", help="work with policy files")
    policy_commands = commands.add_subparsers(policy, dest="policy_command", required=True)
    check = policy_commands.add_parser("check", help="validate a policy file and summarize it")
    check.add_argument("file", type=Path, help="policy YAML file")

    demo = commands.add_parser("demo", help="run the healthcare demo (needs the dev extras)")
    demo.add_argument("--port", type=int, default=27117,
                      help="port of the proxy on 127.0.0.1 (default: 27117)")
    demo.add_argument("--workdir", type=Path, default=Path("run"),
                      help="folder for the demo's server data, keys and logs (default: ./run)")
    demo.add_argument("--no-wait", action="store_true",
                      help="stop after printing the views instead of serving until Ctrl-C")
    return parser


def _run_serve(args: argparse.Namespace) -> int:
    from proxy.server import event_loop
    from proxy.server.app import ServeConfig, serve
    from proxy.server.collector import tune_garbage_collector
    from proxy.session.compression import parse_compressors

    config = ServeConfig(
        listen_host=args.listen[0],
        listen_port=args.listen[1],
        upstream_uri=args.upstream,
        policy_path=args.policy,
        advertise=args.advertise,
        compressors=parse_compressors(args.compressors),
        policy_poll_seconds=args.policy_poll,
        drain_timeout_seconds=args.drain_timeout,
        max_connections=args.max_connections,
        idle_timeout_seconds=args.idle_timeout,
        tls_mode=args.tlsMode,
        tls_certificate_key_file=args.tlsCertificateKeyFile,
        tls_ca_file=args.tlsCAFile,
        tls_allow_connections_without_certificates=args.tlsAllowConnectionsWithoutCertificates,
        metrics_listen=args.metrics_listen,
        metrics_namespaces=args.metrics_namespaces,
        use_uvloop=not args.no_uvloop,
    )
    if args.workers > 1:
        from proxy.server.supervisor import run_supervisor

        return run_supervisor(config, args.workers, log_level=args.log_level,
                              log_format=args.log_format)
    tune_garbage_collector()
    try:
        event_loop.run(serve(config), use_uvloop=config.use_uvloop)
    except KeyboardInterrupt:
        pass
    return 0


def _run_keys(args: argparse.Namespace) -> int:
    from proxy.keys_commands import KeysCommandError

    try:
        lines = asyncio.run(_keys_command(args))
    except KeysCommandError as error:
        print(f"mongoveil keys {args.keys_command}: error: {error}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


async def _keys_command(args: argparse.Namespace) -> list[str]:
    from proxy import keys_commands, keys_lifecycle

    policy, upstream, command = args.policy, args.upstream, args.keys_command
    if command == "init":
        return await keys_commands.init_keys(policy, upstream)
    if command == "list":
        return await keys_commands.list_keys(policy, upstream, as_json=args.json)
    if command == "create":
        return await keys_commands.create_key(policy, upstream, args.class_name)

    confirm = None
    if not args.yes:
        # Checked before connecting, so a script learns at once that it needs --yes.
        if not sys.stdin.isatty():
            raise keys_commands.KeysCommandError(
                "standard input is not a terminal, so no confirmation can be asked; "
                f"pass --yes to {command} without one")
        confirm = keys_commands.terminal_confirm

    if command == "disable":
        return await keys_commands.disable_key(policy, upstream, key_id=args.key_id,
                                               class_name=args.class_name, confirm=confirm)
    if command == "rotate":
        return await keys_lifecycle.rotate_key(policy, upstream, args.class_name, confirm=confirm)
    if command == "rewrap":
        return await keys_lifecycle.rewrap_keys(policy, upstream, args.target, confirm=confirm)
    return await keys_lifecycle.shred_subject(
        policy, upstream, args.class_name, _subject_value(args), reason=args.reason,
        audit=not args.no_audit, confirm=confirm)


def _subject_value(args: argparse.Namespace) -> object:
    """Return the subject of `keys shred`: --subject as a string, or --subject-json decoded."""
    if args.subject is not None:
        return args.subject

    from bson import json_util
    from proxy.keys_commands import KeysCommandError

    try:
        return json_util.loads(args.subject_json)
    except Exception:   # json, bson.errors.InvalidId and others; none may echo the value
        # The text is not echoed: it is a data subject's identifier.
        raise KeysCommandError(
            "--subject-json is not valid MongoDB Extended JSON, for example "
            "'{\"$numberInt\": \"42\"}' or '{\"$oid\": \"<24 hex digits>\"}'") from None


def _run_migrate(args: argparse.Namespace) -> int:
    from proxy.migrate import MigrateError, run_migrate

    try:
        return run_migrate(args.policy, args.namespace, args.upstream, args.batch_size)
    except MigrateError as error:
        print(f"mongoveil migrate: error: {error}", file=sys.stderr)
        return 1


def _run_audit(args: argparse.Namespace) -> int:
    from pymongo.errors import PyMongoError

    from proxy.audit.file_sink import verify_file
    from proxy.policy import load_policy

    def fail(message: str) -> int:
        print(f"mongoveil audit verify: error: {message}", file=sys.stderr)
        return 2

    if not args.file.exists():
        return fail(f"{args.file}: file not found")
    if not args.file.is_file():
        return fail(f"{args.file}: not a regular file")
    policy = load_policy(args.policy)
    try:
        mac_key = asyncio.run(_load_audit_mac_key(policy, args.upstream))
    except PyMongoError as error:
        return fail(f"the audit key could not be read from the key vault "
                    f"{policy.key_vault}: {error}")
    if mac_key is None:
        return fail(f"the key vault {policy.key_vault} has no active audit key (alt name "
                    "mongoveil:audit), so the MACs cannot be checked; use the policy and "
                    "upstream of the proxy that wrote the file")
    try:
        result = verify_file(args.file, mac_key)
    except OSError as error:
        return fail(f"{args.file}: read failed: {error.strerror}")

    if result.intact:
        noun = "record" if result.records == 1 else "records"
        print(f"{args.file}: {result.records} {noun}, chain intact")
        return 0
    print(f"{args.file}: record {result.broken_line} (line {result.broken_line}): "
          f"{result.reason}")
    return 1


async def _load_audit_mac_key(policy, upstream: str) -> bytes | None:
    from proxy.server.audit_trail import load_audit_mac_key
    from proxy.keys_commands import open_vault

    async with open_vault(policy, upstream) as vault:
        return await load_audit_mac_key(vault, create=False)


def _run_policy_check(args: argparse.Namespace) -> int:
    from proxy.policy import check_policy

    print(check_policy(args.file))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from proxy.demo.run import run_demo

    try:
        return run_demo(port=args.port, workdir=args.workdir, wait=not args.no_wait)
    except RuntimeError as error:   # a server of the demo failed to start
        print(f"mongoveil demo: error: {error}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    from proxy.log_format import configure_logging
    from proxy.serve_config import describe_serve_options, parse_command_line

    parser = _build_parser()
    describe_serve_options(parser)
    args, warnings = parse_command_line(parser, argv)
    configure_logging(args.log_level, args.log_format)
    for warning in warnings:
        log.warning("%s", warning)
    # pymongo's debug logging of the key vault client prints whole replies,
    # wrapped data keys included; keep it out of the proxy's log.
    logging.getLogger("pymongo").setLevel(max(logging.INFO, logging.getLogger().level))
    from pymongo.errors import PyMongoError

    from proxy.crypto.errors import KeyDocumentError, MasterKeyError, MasterKeyUnavailable
    from proxy.policy import PolicyError

    handlers = {
        "serve": _run_serve,
        "keys": _run_keys,
        "migrate": _run_migrate,
        "policy": _run_policy_check,
        "audit": _run_audit,
        "demo": _run_demo,
    }
    try:
        return handlers[args.command](args)
    except MasterKeyUnavailable as error:
        print(f"mongoveil: error: {error}", file=sys.stderr)
        return 2
    except MasterKeyError as error:
        if str(error).startswith("environment variable"):
            hint = ("set it to base64 of 96 random bytes (for example the output of "
                    "`openssl rand -base64 96`), or restore it from your backup")
        else:
            hint = ("create it with `mongoveil keys init --policy FILE --upstream URI`, or "
                    "restore it from your backup")
        print(f"mongoveil: error: {error}; {hint}", file=sys.stderr)
        return 2
    except PyMongoError as error:
        # pymongo's messages name hosts and reasons, never the password of a URI.
        # The first clause names the failure; the topology description after it is noise.
        reason = str(error).split(" (configured timeouts")[0]
        print(f"mongoveil: error: the MongoDB server could not be used: "
              f"{type(error).__name__}: {reason}", file=sys.stderr)
        return 2
    except (PolicyError, KeyDocumentError, ValueError, FileNotFoundError) as error:
        print(f"mongoveil: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
