"""The upstream deployment a proxy forwards to, taken from a MongoDB connection string."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pymongo.errors import ConfigurationError, InvalidURI
from pymongo.uri_parser import parse_uri

from proxy.server.tls import UpstreamTLSSettings, upstream_tls_settings


@dataclass(frozen=True)
class UpstreamAddress:
    """One server of the upstream deployment."""

    host: str
    port: int

    def __str__(self) -> str:
        # IPv6 literals need brackets, as in a connection string.
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Upstream:
    """The deployment named by `--upstream`.

    `direct` means the proxy connects every client to `seeds[0]` itself.
    Otherwise it connects each client to the primary (or a mongos) that
    pymongo's server monitoring finds from the seeds.
    """

    seeds: tuple[UpstreamAddress, ...]
    replica_set: str | None
    direct: bool
    tls: UpstreamTLSSettings | None = None     # None: plain TCP

    def describe(self) -> str:
        """Return the deployment for log lines, without credentials."""
        seeds = ",".join(str(seed) for seed in self.seeds)
        if self.direct:
            deployment = seeds
        elif self.replica_set:
            deployment = f"replica set {self.replica_set} (seeds {seeds})"
        else:
            deployment = f"the primary or a mongos of {seeds}"
        return deployment if self.tls is None else f"{deployment}, {self.tls.describe()}"


def parse_upstream(uri: str) -> Upstream:
    """Parse `--upstream`; raises ValueError for an invalid or unsupported URI.

    A single host without `replicaSet` is used directly, as a driver with
    `directConnection=true` would, unless the URI sets `directConnection=false`.
    A `replicaSet` option or several hosts turn on server discovery. The TLS
    options (`tls`, `tlsCAFile`, `tlsCertificateKeyFile`, ...) are read as
    pymongo reads them.
    """
    if uri.startswith("mongodb+srv://"):
        raise ValueError("--upstream: mongodb+srv:// connection strings are not supported yet; "
                         "give the hosts as mongodb://host1:port,host2:port/?replicaSet=NAME")
    try:
        parsed = parse_uri(uri, validate=True)
    except (InvalidURI, ConfigurationError, ValueError) as error:
        raise ValueError(f"invalid --upstream connection string: {_without_credentials(str(error))}"
                         ) from None
    except OSError:
        # pymongo checks that the TLS files are readable, but its message names no file.
        raise ValueError(f"--upstream: {_unreadable_tls_files(uri)}") from None

    options = parsed["options"]
    tls = upstream_tls_settings(options)

    seeds = tuple(UpstreamAddress(host, port) for host, port in parsed["nodelist"])
    replica_set = options.get("replicaSet")
    direct_option = options.get("directConnection")
    if direct_option is None:
        direct = len(seeds) == 1 and replica_set is None
    else:
        # pymongo has already rejected directConnection=true with several hosts.
        direct = direct_option
    return Upstream(seeds, replica_set, direct, tls)


def _unreadable_tls_files(uri: str) -> str:
    """Return a message that names each TLS file option of `uri` whose file cannot be read."""
    options = parse_uri(uri, validate=False)["options"]
    problems = []
    for name, value in options.items():
        if not name.lower().startswith("tls") or not name.lower().endswith("file"):
            continue
        try:
            with open(value, "rb"):
                pass
        except OSError as error:
            problems.append(f"{name} {value}: {error.strerror}")
    return "; ".join(problems) or "a TLS file of the connection string cannot be read"


def _without_credentials(message: str) -> str:
    """Remove `user:password@` from a message that may quote the connection string."""
    return re.sub(r"//[^/@\s]*@", "//<credentials>@", message)
