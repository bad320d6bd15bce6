"""The TLS listener: telling TLS from plain clients, modes, rejections and reload.

The listener runs in the test's event loop on 127.0.0.1 with an echo handler
in place of the proxy's sessions.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import sys
from pathlib import Path

import bson
import pytest

from proxy.server import tls_listener
from proxy.server.tls import ClientTLSSettings, ReloadableContext, client_tls_context
from proxy.server.tls_listener import TLSListener, _peek_prefix, is_tls_client_hello

_TESTS_FOLDER = str(Path(__file__).resolve().parents[1])
if _TESTS_FOLDER not in sys.path:
    sys.path.append(_TESTS_FOLDER)

from tls_certs import TestPKI, make_test_pki  # noqa: E402

TIMEOUT_SECONDS = 5.0
OP_MSG = 2013
OP_QUERY = 2004
OP_REPLY = 1
SSL_HANDSHAKE_FAILED = 141


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def _client_context(pki: TestPKI, ca_file: Path | None = None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file or pki.ca_file))


def _client_hello(pki: TestPKI) -> bytes:
    """Return the first flight of a real TLS client: its ClientHello record."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = _client_context(pki).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def _op_msg(body: dict, request_id: int = 7, padding: int = 0) -> bytes:
    """Encode an OP_MSG request; `padding` extra bytes in the body set its length."""
    if padding:
        body = {**body, "pad": "x" * padding}
    payload = struct.pack("<I", 0) + b"\x00" + bson.encode(body)
    return struct.pack("<iiii", 16 + len(payload), request_id, 0, OP_MSG) + payload


def _op_msg_of_length(length: int, request_id: int = 7) -> bytes:
    frame = _op_msg({"hello": 1, "$db": "admin"}, request_id)
    frame = _op_msg({"hello": 1, "$db": "admin"}, request_id, padding=length - len(frame) - 10)
    assert len(frame) == length
    return frame


def _op_query_hello(request_id: int = 9) -> bytes:
    payload = (struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1)
               + bson.encode({"isMaster": 1}))
    return struct.pack("<iiii", 16 + len(payload), request_id, 0, OP_QUERY) + payload


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _start(pki: TestPKI, mode: str, certificate_key_file: Path | None = None
                 ) -> TLSListener:
    settings = ClientTLSSettings(mode, certificate_key_file or pki.server_certificate_key_file)
    return await TLSListener.start(_echo, "127.0.0.1", 0, client_tls_context(settings),
                                   accept_plain=settings.accepts_plain)


def _port(listener: TLSListener) -> int:
    return listener.sockets[0].getsockname()[1]


async def _echo_round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), TIMEOUT_SECONDS)


async def _open_tls(listener: TLSListener, context: ssl.SSLContext
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", _port(listener), ssl=context, server_hostname="127.0.0.1"), TIMEOUT_SECONDS)


async def _open_plain(listener: TLSListener
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", _port(listener))


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass


# -- telling TLS from plain --------------------------------------------------------------


def test_client_hello_detected(pki):
    assert is_tls_client_hello(_client_hello(pki)[:6]) is True


def test_op_msg_not_client_hello():
    assert is_tls_client_hello(_op_msg({"hello": 1, "$db": "admin"})[:6]) is False


def test_op_msg_starting_with_0x16_not_client_hello():
    # 278 = 0x116: the first byte of the little-endian length is the TLS record type.
    frame = _op_msg_of_length(278)

    assert frame[0] == 0x16
    assert is_tls_client_hello(frame[:6]) is False


def test_short_prefix_not_client_hello(pki):
    assert is_tls_client_hello(_client_hello(pki)[:5]) is False


async def test_peek_waits_for_record_header(pki):
    hello = _client_hello(pki)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        theirs.sendall(hello[:2])
        asyncio.get_running_loop().call_later(0.05, theirs.sendall, hello[2:])

        prefix = await asyncio.wait_for(_peek_prefix(ours), TIMEOUT_SECONDS)

        assert prefix == hello[:6]
        assert ours.recv(len(hello)) == hello     # peeking consumed nothing
    finally:
        ours.close()
        theirs.close()


async def test_peek_returns_empty_on_close():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.close()
    try:
        assert await asyncio.wait_for(_peek_prefix(ours), TIMEOUT_SECONDS) == b""
    finally:
        ours.close()


# -- modes -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["allowTLS", "preferTLS"])
async def test_mixed_modes_serve_both(pki, mode):
    listener = await _start(pki, mode)
    try:
        reader, writer = await _open_tls(listener, _client_context(pki))
        assert await _echo_round_trip(reader, writer, b"over tls") == b"over tls"
        assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        await _close(writer)

        reader, writer = await _open_plain(listener)
        assert await _echo_round_trip(reader, writer, b"plain text") == b"plain text"
        assert writer.get_extra_info("ssl_object") is None
        await _close(writer)
    finally:
        listener.close()
        await listener.wait_closed()


async def test_mixed_mode_plain_frame_starting_with_0x16(pki):
    listener = await _start(pki, "allowTLS")
    frame = _op_msg_of_length(278)
    try:
        reader, writer = await _open_plain(listener)

        assert await _echo_round_trip(reader, writer, frame) == frame

        await _close(writer)
    finally:
        listener.close()


async def test_require_tls_serves_tls(pki):
    listener = await _start(pki, "requireTLS")
    try:
        reader, writer = await _open_tls(listener, _client_context(pki))

        assert await _echo_round_trip(reader, writer, b"over tls") == b"over tls"

        await _close(writer)
    finally:
        listener.close()


async def test_require_tls_rejects_plain_op_msg(pki, caplog):
    listener = await _start(pki, "requireTLS")
    try:
        reader, writer = await _open_plain(listener)
        writer.write(_op_msg({"hello": 1, "$db": "admin"}, request_id=41))
        with caplog.at_level(logging.WARNING, logger="proxy.server.tls_listener"):
            reply = await asyncio.wait_for(reader.read(), TIMEOUT_SECONDS)   # until the close
        await _close(writer)
    finally:
        listener.close()

    length, _, response_to, op_code = struct.unpack_from("<iiii", reply)
    assert length == len(reply)
    assert (response_to, op_code) == (41, OP_MSG)
    body = bson.decode(reply[21:])
    assert body["ok"] == 0
    assert body["code"] == SSL_HANDSHAKE_FAILED
    assert "requires TLS" in body["errmsg"]
    assert "connected without TLS, which --tlsMode requireTLS rejects" in caplog.text


async def test_require_tls_rejects_plain_op_query(pki):
    listener = await _start(pki, "requireTLS")
    try:
        reader, writer = await _open_plain(listener)
        writer.write(_op_query_hello(request_id=43))
        reply = await asyncio.wait_for(reader.read(), TIMEOUT_SECONDS)
        await _close(writer)
    finally:
        listener.close()

    _, _, response_to, op_code = struct.unpack_from("<iiii", reply)
    flags, _, _, count = struct.unpack_from("<iqii", reply, 16)
    assert (response_to, op_code) == (43, OP_REPLY)
    assert flags & 2        # QueryFailure
    assert count == 1
    assert bson.decode(reply[36:])["code"] == SSL_HANDSHAKE_FAILED


async def test_require_tls_closes_oversized_plain_request(pki):
    listener = await _start(pki, "requireTLS")
    try:
        reader, writer = await _open_plain(listener)
        writer.write(struct.pack("<iiii", 64 * 1024 * 1024, 1, 0, OP_MSG))

        assert await asyncio.wait_for(reader.read(), TIMEOUT_SECONDS) == b""

        await _close(writer)
    finally:
        listener.close()


# -- failures and probes -----------------------------------------------------------------


def _blocking_tls_connect(port: int, context: ssl.SSLContext) -> None:
    """Connect as a blocking driver does (pymongo's MongoClient); it sends an alert on failure."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_SECONDS) as sock:
        context.wrap_socket(sock, server_hostname="127.0.0.1").close()


async def _wait_for_log(caplog: pytest.LogCaptureFixture, text: str) -> None:
    for _ in range(100):
        if text in caplog.text:
            return
        await asyncio.sleep(0.02)


async def test_untrusted_server_certificate_logged(pki, caplog):
    listener = await _start(pki, "requireTLS")
    try:
        with caplog.at_level(logging.WARNING, logger="proxy.server.tls_listener"):
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.to_thread(_blocking_tls_connect, _port(listener),
                                        _client_context(pki, pki.wrong_ca_file))
            await _wait_for_log(caplog, "TLS handshake with client")

        assert "TLS handshake with client 127.0.0.1:" in caplog.text
        assert "failed: tlsv1 alert unknown ca" in caplog.text
        # The listener still serves.
        reader, writer = await _open_tls(listener, _client_context(pki))
        assert await _echo_round_trip(reader, writer, b"still up") == b"still up"
        await _close(writer)
    finally:
        listener.close()


async def test_client_closing_handshake_logged(pki, caplog):
    listener = await _start(pki, "requireTLS")
    try:
        with caplog.at_level(logging.WARNING, logger="proxy.server.tls_listener"):
            # asyncio's client closes without an alert when it rejects the certificate.
            with pytest.raises(ssl.SSLCertVerificationError):
                await _open_tls(listener, _client_context(pki, pki.wrong_ca_file))
            await _wait_for_log(caplog, "TLS handshake with client")
    finally:
        listener.close()

    assert "failed: connection closed (ConnectionResetError)" in caplog.text


async def test_repeated_failures_logged_once(pki, caplog):
    listener = await _start(pki, "requireTLS")
    try:
        with caplog.at_level(logging.WARNING, logger="proxy.server.tls_listener"):
            for _ in range(3):
                reader, writer = await _open_plain(listener)
                writer.write(_op_msg({"hello": 1, "$db": "admin"}))
                await asyncio.wait_for(reader.read(), TIMEOUT_SECONDS)
                await _close(writer)
    finally:
        listener.close()

    assert caplog.text.count("connected without TLS") == 1


async def test_repeated_reason_logged_once_others_still(pki, caplog):
    listener = await _start(pki, "requireTLS")
    wrong_ca = _client_context(pki, pki.wrong_ca_file)
    try:
        with caplog.at_level(logging.WARNING, logger="proxy.server.tls_listener"):
            for _ in range(2):
                with pytest.raises(ssl.SSLCertVerificationError):
                    await asyncio.to_thread(_blocking_tls_connect, _port(listener), wrong_ca)
            with pytest.raises(ssl.SSLCertVerificationError):
                await _open_tls(listener, wrong_ca)
            await _wait_for_log(caplog, "connection closed")
    finally:
        listener.close()

    assert caplog.text.count("failed: tlsv1 alert unknown ca") == 1
    assert caplog.text.count("failed: connection closed (ConnectionResetError)") == 1


async def test_connect_and_close_logs_no_warning(pki, caplog):
    listener = await _start(pki, "requireTLS")
    try:
        with caplog.at_level(logging.INFO, logger="proxy.server.tls_listener"):
            with socket.create_connection(("127.0.0.1", _port(listener))):
                pass
            await asyncio.sleep(0.1)
            reader, writer = await _open_tls(listener, _client_context(pki))
            assert await _echo_round_trip(reader, writer, b"after probe") == b"after probe"
            await _close(writer)
    finally:
        listener.close()

    assert not [record for record in caplog.records
                if record.name == "proxy.server.tls_listener" and record.levelno >= logging.INFO]


async def test_silent_client_times_out(pki, monkeypatch, caplog):
    monkeypatch.setattr(tls_listener, "HANDSHAKE_TIMEOUT_SECONDS", 0.2)
    listener = await _start(pki, "requireTLS")
    try:
        with caplog.at_level(logging.INFO, logger="proxy.server.tls_listener"):
            reader, writer = await _open_plain(listener)

            assert await asyncio.wait_for(reader.read(), TIMEOUT_SECONDS) == b""

            await _close(writer)
    finally:
        listener.close()

    assert "sent nothing within 0.2 s" in caplog.text


# -- life cycle --------------------------------------------------------------------------


async def test_reload_keeps_open_connections(pki, tmp_path):
    certificate_file = pki.server.write_certificate_key_file(tmp_path / "server.pem")
    listener = await _start(pki, "requireTLS", certificate_file)
    try:
        old_reader, old_writer = await _open_tls(listener, _client_context(pki))
        renewed = pki.ca.issue_server("renewed server")
        renewed.write_certificate_key_file(certificate_file)

        assert listener.tls.reload("test") is True

        reader, writer = await _open_tls(listener, _client_context(pki))
        assert writer.get_extra_info("ssl_object").getpeercert(binary_form=True) == renewed.der
        assert await _echo_round_trip(old_reader, old_writer, b"old one") == b"old one"
        assert (old_writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                == pki.server.der)
        await _close(writer)
        await _close(old_writer)
    finally:
        listener.close()


async def test_close_stops_accepting(pki):
    listener = await _start(pki, "allowTLS")
    port = _port(listener)
    serving = asyncio.create_task(listener.serve_forever())
    await asyncio.sleep(0)

    listener.close()

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(serving, TIMEOUT_SECONDS)
    assert listener.is_serving() is False
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_serve_forever_cancel_closes(pki):
    listener = await _start(pki, "allowTLS")
    serving = asyncio.create_task(listener.serve_forever())
    await asyncio.sleep(0)

    serving.cancel()

    with pytest.raises(asyncio.CancelledError):
        await serving
    assert listener.is_serving() is False


async def test_bind_busy_port_raises(pki):
    first = await _start(pki, "allowTLS")
    settings = ClientTLSSettings("allowTLS", pki.server_certificate_key_file)
    try:
        with pytest.raises(OSError):
            await TLSListener.start(_echo, "127.0.0.1", _port(first), client_tls_context(settings),
                                    accept_plain=True)
    finally:
        first.close()


async def test_reuse_port_listeners_share_port(pki):
    settings = ClientTLSSettings("allowTLS", pki.server_certificate_key_file)
    first = await TLSListener.start(_echo, "127.0.0.1", 0, client_tls_context(settings),
                                    accept_plain=True, reuse_port=True)
    try:
        second = await TLSListener.start(_echo, "127.0.0.1", _port(first),
                                         client_tls_context(settings), accept_plain=True,
                                         reuse_port=True)
        try:
            assert _port(second) == _port(first)
            reader, writer = await _open_tls(second, _client_context(pki))
            assert await _echo_round_trip(reader, writer, b"ping") == b"ping"
            await _close(writer)
        finally:
            second.close()
    finally:
        first.close()


async def test_listener_uses_current_context(pki):
    tls = client_tls_context(ClientTLSSettings("requireTLS", pki.server_certificate_key_file))
    assert isinstance(tls, ReloadableContext)
    listener = await TLSListener.start(_echo, "127.0.0.1", 0, tls, accept_plain=False)
    try:
        other = pki.ca.issue_server("swapped in")
        tls.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.context.load_cert_chain(other.write_certificate_key_file(
            Path(pki.ca_file).parent / "swapped.pem"))

        reader, writer = await _open_tls(listener, _client_context(pki))

        assert writer.get_extra_info("ssl_object").getpeercert(binary_form=True) == other.der
        await _close(writer)
    finally:
        listener.close()
