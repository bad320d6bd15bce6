import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.wire.errors import ProtocolError
from proxy.wire.framing import DEFAULT_MAX_MESSAGE_SIZE, FrameReader


def make_frame(payload: bytes, request_id: int = 1) -> bytes:
    """Build a frame by hand: header with the right length, then the payload."""
    return struct.pack("<iiii", 16 + len(payload), request_id, 0, 2013) + payload


FRAMES = [make_frame(b"a" * 5, 1), make_frame(b"", 2), make_frame(bytes(range(200)), 3)]


def drain(reader: FrameReader) -> list[bytes]:
    frames = []
    while (frame := reader.next_frame()) is not None:
        frames.append(frame)
    return frames


def test_reader_whole_buffer():
    reader = FrameReader(1000)
    reader.feed(b"".join(FRAMES))

    assert drain(reader) == FRAMES
    assert reader.pending_bytes == 0


def test_reader_one_byte_at_a_time():
    reader = FrameReader(1000)
    frames = []
    for byte in b"".join(FRAMES):
        reader.feed(bytes([byte]))
        frames.extend(drain(reader))

    assert frames == FRAMES


def test_reader_partial_frame_waits():
    reader = FrameReader(1000)
    reader.feed(FRAMES[2][:-1])

    assert reader.next_frame() is None
    assert reader.pending_bytes == len(FRAMES[2]) - 1


def test_reader_partial_length_waits():
    reader = FrameReader(1000)
    reader.feed(b"\xff\xff\xff")

    assert reader.next_frame() is None


def test_reader_empty_returns_none():
    assert FrameReader(1000).next_frame() is None


def test_reader_keeps_bytes_of_next_frame():
    reader = FrameReader(1000)
    reader.feed(FRAMES[0] + FRAMES[1][:7])

    assert reader.next_frame() == FRAMES[0]
    assert reader.next_frame() is None
    assert reader.pending_bytes == 7


def test_reader_oversized_rejected_at_length():
    reader = FrameReader(100)

    expected = "messageLength 101 exceeds the maximum message size of 100"
    with pytest.raises(ProtocolError, match=expected):
        reader.feed(struct.pack("<i", 101))


def test_reader_oversized_rejected_by_next_frame():
    reader = FrameReader(100)
    with pytest.raises(ProtocolError):
        reader.feed(struct.pack("<i", 101))

    with pytest.raises(ProtocolError, match="exceeds"):
        reader.next_frame()


def test_reader_undersized_rejected():
    reader = FrameReader(100)

    with pytest.raises(ProtocolError, match="messageLength 15 is smaller than the 16-byte header"):
        reader.feed(struct.pack("<i", 15))


def test_reader_negative_length_rejected():
    reader = FrameReader(100)

    with pytest.raises(ProtocolError, match="messageLength -1"):
        reader.feed(b"\xff\xff\xff\xff")


def test_reader_rejects_second_frame_length():
    reader = FrameReader(100)
    reader.feed(FRAMES[0] + struct.pack("<i", 3))

    assert reader.next_frame() == FRAMES[0]
    with pytest.raises(ProtocolError, match="smaller than"):
        reader.next_frame()


def test_reader_max_size_exact_accepted():
    frame = make_frame(b"x" * 84)
    reader = FrameReader(100)
    reader.feed(frame)

    assert reader.next_frame() == frame


def test_reader_max_size_raised_later():
    frame = make_frame(b"x" * 150)
    reader = FrameReader(100)
    reader.max_message_size = 200
    reader.feed(frame)

    assert reader.next_frame() == frame


def test_reader_max_size_below_header():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        FrameReader(15)


def test_reader_default_max_size():
    assert FrameReader().max_message_size == DEFAULT_MAX_MESSAGE_SIZE


@given(st.lists(st.binary(max_size=60), max_size=8))
def test_reader_frames_or_rejects(chunks):
    reader = FrameReader(64)
    frames = []
    try:
        for chunk in chunks:
            reader.feed(chunk)
            frames.extend(drain(reader))
    except ProtocolError:
        return

    # Without an error, the frames are the start of the stream and the rest waits.
    stream = b"".join(chunks)
    assert b"".join(frames) == stream[: len(stream) - reader.pending_bytes]
    for frame in frames:
        assert struct.unpack_from("<i", frame)[0] == len(frame)


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=5), st.data())
def test_reader_any_split(payloads, data):
    stream = b"".join(make_frame(payload, index) for index, payload in enumerate(payloads))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = FrameReader(1000)
    frames = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        reader.feed(stream[start:end])
        frames.extend(drain(reader))

    assert frames == [make_frame(payload, index) for index, payload in enumerate(payloads)]


def test_reader_whole_read_returned_without_copy():
    # A read that holds exactly one frame, as most reads do, is the frame itself.
    frame = FRAMES[2]
    reader = FrameReader(1000)
    reader.feed(frame)

    assert reader.next_frame() is frame
    assert reader.pending_bytes == 0


def test_reader_feeds_without_draining_in_between():
    stream = b"".join(FRAMES)
    reader = FrameReader(1000)
    for start in range(0, len(stream), 7):
        reader.feed(stream[start:start + 7])

    assert reader.pending_bytes == len(stream)
    assert drain(reader) == FRAMES
    assert reader.pending_bytes == 0


def test_reader_bytearray_input_copied():
    data = bytearray(FRAMES[0])
    reader = FrameReader(1000)
    reader.feed(data)
    data[16:] = b"changed"

    assert reader.next_frame() == FRAMES[0]


def test_reader_rest_of_read_kept_for_next_frame():
    reader = FrameReader(1000)
    reader.feed(FRAMES[0] + FRAMES[2][:20])

    assert reader.next_frame() == FRAMES[0]
    assert reader.next_frame() is None
    assert reader.pending_bytes == 20

    reader.feed(FRAMES[2][20:] + FRAMES[1])

    assert drain(reader) == [FRAMES[2], FRAMES[1]]


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=6), st.data())
def test_reader_pending_bytes_any_split(payloads, data):
    stream = b"".join(make_frame(payload, index) for index, payload in enumerate(payloads))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = FrameReader(1000)
    returned = 0
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        reader.feed(stream[start:end])
        if data.draw(st.booleans()):
            returned += sum(len(frame) for frame in drain(reader))
        assert reader.pending_bytes == end - returned
