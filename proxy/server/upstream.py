"""The upstream server a proxy forwards to, taken from a MongoDB connection string."""

from __future__ import annotations

from dataclasses import dataclass

from pymongo.errors import InvalidURI
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
    try:
        parsed = parse_uri(uri, validate=True)
    except (InvalidURI, ValueError) as error:
        # pymongo's message may quote the URI, which can hold a password.
        raise ValueError(f"invalid --upstream connection string: {type(error).__name__}") from None

    if parsed["options"].get("tls"):
        raise ValueError("TLS to the upstream server is not supported yet; use a tls=false URI")

    host, port = parsed["nodelist"][0]
    return UpstreamAddress(host, port)
