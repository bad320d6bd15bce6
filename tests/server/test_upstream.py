"""Parsing `--upstream` into the deployment the proxy forwards to."""

from __future__ import annotations

import pytest

from proxy.server.upstream import Upstream, UpstreamAddress, parse_upstream


def test_parse_single_host_is_direct():
    upstream = parse_upstream("mongodb://db.internal:27018/")

    assert upstream == Upstream((UpstreamAddress("db.internal", 27018),), None, direct=True)


def test_parse_default_port():
    upstream = parse_upstream("mongodb://db.internal")

    assert upstream.seeds == (UpstreamAddress("db.internal", 27017),)


def test_parse_direct_connection_true_is_direct():
    upstream = parse_upstream("mongodb://a:1/?directConnection=true&replicaSet=rs0")

    assert upstream.direct is True
    assert upstream.replica_set == "rs0"


def test_parse_direct_connection_false_discovers():
    upstream = parse_upstream("mongodb://a:1/?directConnection=false")

    assert upstream.direct is False
    assert upstream.replica_set is None


def test_parse_replica_set_uri():
    upstream = parse_upstream("mongodb://u:secret@a:1,b:2,c:3/?replicaSet=rs0&authSource=admin")

    assert upstream.seeds == (UpstreamAddress("a", 1), UpstreamAddress("b", 2),
                              UpstreamAddress("c", 3))
    assert upstream.replica_set == "rs0"
    assert upstream.direct is False


def test_parse_single_host_with_replica_set_discovers():
    upstream = parse_upstream("mongodb://a:1/?replicaSet=rs0")

    assert upstream.direct is False


def test_parse_several_hosts_without_replica_set_discovers():
    upstream = parse_upstream("mongodb://mongos1:1,mongos2:2/")

    assert upstream.direct is False
    assert upstream.replica_set is None


def test_parse_direct_with_several_hosts_rejected():
    with pytest.raises(ValueError, match="invalid --upstream connection string"):
        parse_upstream("mongodb://a:1,b:2/?directConnection=true")


def test_parse_srv_rejected():
    with pytest.raises(ValueError, match=r"mongodb\+srv:// connection strings are not supported"):
        parse_upstream("mongodb+srv://cluster.example.com/")


def test_parse_tls_true_enables_tls():
    upstream = parse_upstream("mongodb://a:1/?tls=true")

    assert upstream.tls is not None
    assert upstream.tls.ca_file is None
    assert upstream.tls.allow_invalid_hostnames is False


def test_parse_without_tls_is_plain():
    assert parse_upstream("mongodb://a:1/").tls is None


def test_describe_names_tls():
    assert parse_upstream("mongodb://a:1/?tls=true").describe() == (
        "a:1, TLS with the system's CA certificates")


def test_address_str_ipv4():
    assert str(UpstreamAddress("127.0.0.1", 27017)) == "127.0.0.1:27017"


def test_address_str_ipv6_bracketed():
    assert str(UpstreamAddress("::1", 27017)) == "[::1]:27017"


def test_describe_direct():
    assert parse_upstream("mongodb://a:1/").describe() == "a:1"


def test_describe_replica_set():
    description = parse_upstream("mongodb://a:1,b:2/?replicaSet=rs0").describe()

    assert description == "replica set rs0 (seeds a:1,b:2)"


def test_describe_omits_credentials():
    description = parse_upstream("mongodb://user:hunter2@a:1,b:2/?replicaSet=rs0").describe()

    assert "hunter2" not in description
