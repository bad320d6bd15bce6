from proxy.wire.errors import ProtocolError


def test_error_names_offset():
    error = ProtocolError("string length is truncated", 42)

    assert str(error) == "string length is truncated (at byte 42)"
    assert error.offset == 42


def test_error_without_offset():
    error = ProtocolError("frame is invalid")

    assert str(error) == "frame is invalid"
    assert error.offset is None
