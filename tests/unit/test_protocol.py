"""The agent wire protocol: frame layout, incremental decoding, refusals, and fuzzing."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fission.guest import protocol
from fission.guest.protocol import HEADER_SIZE, Frame, FrameDecoder, FrameType, ProtocolError

MAX = 1024

frame_types = st.sampled_from(list(FrameType))
request_ids = st.integers(0, 2**32 - 1)
frames = st.lists(st.tuples(frame_types, request_ids, st.binary(max_size=300)), max_size=8)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=6)


def wire_of(items: list[tuple[FrameType, int, bytes]]) -> bytes:
    return b"".join(protocol.encode(t, r, p) for t, r, p in items)


def as_tuples(decoded: list[Frame]) -> list[tuple[FrameType, int, bytes]]:
    return [(f.type, f.request_id, f.payload) for f in decoded]


def header(
    magic: bytes = b"FS", version: int = 1, kind: int = 5, rid: int = 1, length: int = 0
) -> bytes:
    return protocol.HEADER.pack(magic, version, kind, rid, length)


def test_the_wire_layout_is_pinned() -> None:
    # Host and guest may run different builds of this module; the byte layout must not drift.
    wire = protocol.encode(FrameType.STDOUT, 0x01020304, b"xyz")
    assert wire == b"FS\x01\x05\x01\x02\x03\x04\x00\x00\x00\x03xyz"
    assert HEADER_SIZE == 12
    assert protocol.PROTOCOL_VERSION == 1


def test_frame_type_numbers_are_pinned() -> None:
    assert {t.name: t.value for t in FrameType} == {
        "INIT": 1,
        "HELLO": 2,
        "EXEC": 3,
        "STDIN": 4,
        "STDOUT": 5,
        "STDERR": 6,
        "EXIT": 7,
        "KILL": 8,
        "ERROR": 9,
        "PING": 10,
        "PONG": 11,
        "PREPARE": 12,
        "READY": 13,
        "FILE": 14,
        "DATA": 15,
        "RESULT": 16,
        "DROP": 17,
        "LISTEN": 18,
        "OPEN": 19,
        "STREAM": 20,
        "CLOSE": 21,
        "CREDIT": 22,
        "CONNECT": 40,
        "PTY": 41,
        "RESIZE": 42,
        "WATCH": 50,
        "EVENT": 51,
    }


@pytest.mark.parametrize("frame_type", list(FrameType))
@pytest.mark.parametrize("payload", [b"", b"\x00", b"x" * MAX])
def test_every_frame_type_round_trips(frame_type: FrameType, payload: bytes) -> None:
    decoded = FrameDecoder(MAX).feed(protocol.encode(frame_type, 7, payload))
    assert decoded == [Frame(frame_type, 7, payload)]


@pytest.mark.parametrize("request_id", [0, 1, 2**31, 2**32 - 1])
def test_request_ids_use_all_32_bits(request_id: int) -> None:
    [frame] = FrameDecoder(MAX).feed(protocol.encode(FrameType.KILL, request_id))
    assert frame.request_id == request_id


@pytest.mark.parametrize("request_id", [-1, 2**32, 2**40])
def test_request_ids_outside_32_bits_are_refused(request_id: int) -> None:
    with pytest.raises(ProtocolError, match="32 bits"):
        protocol.encode(FrameType.KILL, request_id)


@given(frames)
def test_byte_by_byte_gives_the_same_frames(items: list[tuple[FrameType, int, bytes]]) -> None:
    wire = wire_of(items)
    decoder = FrameDecoder(MAX)
    decoded: list[Frame] = []
    for index in range(len(wire)):
        decoded += decoder.feed(wire[index : index + 1])
    assert as_tuples(decoded) == items
    assert decoder.buffered == 0


@given(frames, st.data())
def test_any_split_gives_the_same_frames(
    items: list[tuple[FrameType, int, bytes]], data: st.DataObject
) -> None:
    wire = wire_of(items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    decoder = FrameDecoder(MAX)
    decoded: list[Frame] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        decoded += decoder.feed(wire[start:cut])
        start = cut
    assert as_tuples(decoded) == items
    assert decoder.buffered == 0


def test_a_partial_frame_waits_for_the_rest() -> None:
    wire = protocol.encode(FrameType.STDERR, 3, b"abcdef")
    decoder = FrameDecoder(MAX)
    assert decoder.feed(wire[: HEADER_SIZE + 2]) == []
    assert decoder.buffered == 2
    assert decoder.feed(wire[HEADER_SIZE + 2 :]) == [Frame(FrameType.STDERR, 3, b"abcdef")]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (header(magic=b"XX"), "magic"),
        (header(magic=b"SF"), "magic"),
        (header(version=0), "version"),
        (header(version=2), "version"),
        (header(kind=0), "unknown frame type"),
        (header(kind=23), "unknown frame type"),
        (header(kind=255), "unknown frame type"),
        (header(length=MAX + 1), "exceeds the limit"),
        (header(length=2**32 - 1), "exceeds the limit"),
    ],
)
def test_bad_headers_are_refused_before_any_payload(raw: bytes, message: str) -> None:
    # Only the 12 header bytes are fed: a bad or oversized frame is refused before its payload
    # arrives, so a hostile peer cannot make the decoder wait for (and buffer) it.
    with pytest.raises(ProtocolError, match=message):
        FrameDecoder(MAX).feed(raw)


def test_a_payload_of_exactly_the_limit_is_accepted() -> None:
    assert FrameDecoder(MAX).feed(header(length=MAX) + b"y" * MAX)[0].payload == b"y" * MAX


def test_a_bad_frame_after_good_ones_is_still_refused() -> None:
    decoder = FrameDecoder(MAX)
    assert len(decoder.feed(protocol.encode(FrameType.PING, 0))) == 1
    with pytest.raises(ProtocolError):
        decoder.feed(protocol.encode(FrameType.PONG, 0) + header(version=9))


@given(json_objects)
def test_json_control_frames_round_trip(message: dict[str, Any]) -> None:
    [frame] = FrameDecoder(1 << 20).feed(protocol.encode_json(FrameType.EXIT, 4, message))
    assert frame.type == FrameType.EXIT
    assert protocol.decode_json(frame.payload) == message


def test_json_payloads_are_compact_utf8() -> None:
    assert protocol.dump_json({"a": [1, 2], "b": "\u00e9"}) == '{"a":[1,2],"b":"\u00e9"}'.encode()


@pytest.mark.parametrize(
    "payload",
    [b"[1, 2]", b'"text"', b"42", b"null", b"true", b"[]", b"1.5"],
)
def test_decode_json_refuses_anything_but_an_object(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="JSON object"):
        protocol.decode_json(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{",
        b"{not json}",
        b"{'a': 1}",
        b'{"a": 1,}',
        b"\xff",
        b'{"a": "\xc3\x28"}',
        b"\xef\xbb\xbf{}",
        b'{"a": 1} trailing',
    ],
)
def test_decode_json_refuses_invalid_utf8_and_json(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="not valid JSON"):
        protocol.decode_json(payload)


@pytest.mark.parametrize("payload", [b"[" * 10_000, b'{"a":' * 10_000])
def test_decode_json_refuses_deep_nesting(payload: bytes) -> None:
    # Fits well inside MAX_GUEST_PAYLOAD, so a hostile guest can send it.
    assert len(payload) <= protocol.MAX_GUEST_PAYLOAD
    with pytest.raises(ProtocolError):
        protocol.decode_json(payload)


# Fuzzing: valid frames and raw garbage mixed, so the decoder is driven past the magic check.
small_frames = st.builds(protocol.encode, frame_types, request_ids, st.binary(max_size=MAX // 4))
chunks = st.lists(st.one_of(small_frames, st.binary(max_size=64)), max_size=8).map(b"".join)


def feed_checked(decoder: FrameDecoder, data: bytes) -> list[Frame]:
    """Feed ``data``; only ProtocolError may escape, and the buffer must stay bounded."""
    decoded = decoder.feed(data)
    for frame in decoded:
        assert isinstance(frame.type, FrameType)
        assert len(frame.payload) <= MAX
    assert decoder.buffered <= MAX + HEADER_SIZE
    return decoded


@settings(max_examples=500)
@given(st.binary(max_size=4000))
def test_fuzz_arbitrary_bytes_at_once(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        feed_checked(FrameDecoder(MAX), data)


@settings(max_examples=500)
@given(chunks, st.data())
def test_fuzz_mixed_frames_and_garbage_in_any_split(data: bytes, draw: st.DataObject) -> None:
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=8)))
    decoder = FrameDecoder(MAX)
    start = 0
    try:
        for cut in [*cuts, len(data)]:
            feed_checked(decoder, data[start:cut])
            start = cut
    except ProtocolError:
        pass


@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_fuzz_parse_header(raw: bytes) -> None:
    try:
        frame_type, _, length = protocol.parse_header(raw, MAX)
    except ProtocolError:
        return
    assert raw[:2] == b"FS" and raw[2] == protocol.PROTOCOL_VERSION
    assert frame_type == raw[3] and length <= MAX


@given(st.binary(max_size=200))
def test_fuzz_decode_json(payload: bytes) -> None:
    try:
        message = protocol.decode_json(payload)
    except ProtocolError:
        return
    assert isinstance(message, dict)
