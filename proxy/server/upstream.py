"""The upstream server a proxy forwards to, taken from a MongoDB connection string."""

from __future__ import annotations

from dataclasses import dataclass

import re

from pymongo.errors import ConfigurationError, InvalidURI
from pymongo.uri_parser import parse_uri


@dataclass(frozen=True)
class UpstreamAddress:
    host: str
    port: int


def parse_upstream(uri: str) -> UpstreamAddress:
    """Return the first host of `uri`; raises ValueError for an invalid or unsupported URI.

    TODO: a replica-set URI with several hosts is served from its first host
    only; following elections needs server monitoring in the proxy.
    """
    if uri.startswith("mongodb+srv://"):
        raise ValueError("--upstream: mongodb+srv:// connection strings are not supported yet; "
                         "give the hosts as mongodb://host1:port,host2:port/?replicaSet=NAME")
    try:
        parsed = parse_uri(uri, validate=True)
    except (InvalidURI, ConfigurationError, ValueError) as error:
        raise ValueError(f"invalid --upstream connection string: {_without_credentials(str(error))}"
                         ) from None

    if parsed["options"].get("tls"):
        raise ValueError("TLS to the upstream server is not supported yet; use a tls=false URI")

    host, port = parsed["nodelist"][0]
    return UpstreamAddress(host, port)


def _without_credentials(message: str) -> str:
    """Remove `user:password@` from a message that may quote the connection string."""
    return re.sub(r"//[^/@\s]*@", "//<credentials>@", message)
