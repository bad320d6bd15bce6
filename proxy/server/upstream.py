"""The upstream deployment a proxy forwards to, taken from a MongoDB connection string."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pymongo.errors import ConfigurationError, InvalidURI
from pymongo.uri_parser import parse_uri


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

    def describe(self) -> str:
        """Return the deployment for log lines, without credentials."""
        seeds = ",".join(str(seed) for seed in self.seeds)
        if self.direct:
            return seeds
        if self.replica_set:
            return f"replica set {self.replica_set} (seeds {seeds})"
        return f"the primary or a mongos of {seeds}"


def parse_upstream(uri: str) -> Upstream:
    """Parse `--upstream`; raises ValueError for an invalid or unsupported URI.

    A single host without `replicaSet` is used directly, as a driver with
    `directConnection=true` would, unless the URI sets `directConnection=false`.
    A `replicaSet` option or several hosts turn on server discovery.
    """
    if uri.startswith("mongodb+srv://"):
        raise ValueError("--upstream: mongodb+srv:// connection strings are not supported yet; "
                         "give the hosts as mongodb://host1:port,host2:port/?replicaSet=NAME")
    try:
        parsed = parse_uri(uri, validate=True)
    except (InvalidURI, ConfigurationError, ValueError) as error:
        raise ValueError(f"invalid --upstream connection string: {_without_credentials(str(error))}"
                         ) from None

    options = parsed["options"]
    if options.get("tls"):
        raise ValueError("TLS to the upstream server is not supported yet; use a tls=false URI")

    seeds = tuple(UpstreamAddress(host, port) for host, port in parsed["nodelist"])
    replica_set = options.get("replicaSet")
    direct_option = options.get("directConnection")
    if direct_option is None:
        direct = len(seeds) == 1 and replica_set is None
    else:
        # pymongo has already rejected directConnection=true with several hosts.
        direct = direct_option
    return Upstream(seeds, replica_set, direct)


def _without_credentials(message: str) -> str:
    """Remove `user:password@` from a message that may quote the connection string."""
    return re.sub(r"//[^/@\s]*@", "//<credentials>@", message)
