"""Frame codec: golden vector, round trips, and every bit flip or truncation rejected."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgebus import FrameError, OversizeError, SignatureError, VersionError
from edgebus._digest import digest
from edgebus._frame import (
    Codec,
    Kind,
    check_payload,
    decode_frame,
    decode_header,
    encode_frame,
    encode_header,
    make_header,
)

KEY = b"k" * 32


def test_golden_vector() -> None:
    header = make_header(Kind.PING, "a", 1, 1.0, [], fields={"c": "x"})
    encoded = encode_header(b"ctl", header, KEY)
    assert encoded[:3] == b"EB\x02"
    # Pinned: a change here is a wire format change and must bump VERSION.
    assert hashlib.sha256(encoded).hexdigest() == GOLDEN_SHA256
    assert decode_header(b"ctl", encoded, KEY) == header


GOLDEN_SHA256 = "b2e6afebb8a69fa2a33f8c3ec1fb0badca7060e61689511d1fae48f0ea60ea0b"


def test_payload_digest_is_blake3() -> None:
    # The BLAKE3 reference test vector for the empty input (BLAKE3 team's test_vectors.json).
    assert digest(b"").hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    parts = [b"hello ", b"world"]
    assert make_header(Kind.CHUNK, "n", 5, 2.0, parts).digest == digest(b"hello world")


def test_round_trip_with_payload() -> None:
    parts = [b"hello ", b"world"]
    header = make_header(Kind.CHUNK, "n", 5, 2.0, parts, fields={"c": "card", "i": 3})
    frames = encode_frame(b"dat", header, parts, KEY)
    topic, decoded, payload = decode_frame(frames, KEY, max_payload_bytes=100)
    assert topic == b"dat"
    assert decoded == header
    assert b"".join(bytes(p) for p in payload) == b"hello world"
    assert decoded.digest == digest(b"hello world")
    assert decoded.codec is Codec.RAW


@given(
    topic=st.binary(max_size=40),
    sender=st.text(min_size=1, max_size=64),
    seq=st.integers(0, 2**64 - 1),
    payload=st.lists(st.binary(max_size=200), max_size=4),
    fields=st.dictionaries(
        st.text(max_size=8), st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(), st.none())
    ),
)
def test_round_trip_property(topic: bytes, sender: str, seq: int, payload: list[bytes], fields: dict) -> None:
    header = make_header(Kind.REQUEST, sender, seq, 3.25, payload, fields=fields)
    frames = encode_frame(topic, header, payload, KEY)
    _, decoded, parts = decode_frame(frames, KEY, max_payload_bytes=1 << 20)
    assert decoded == header
    assert [bytes(p) for p in parts] == [p for p in payload]


def test_every_bit_flip_in_topic_or_header_is_rejected() -> None:
    parts = [b"payload"]
    frames = encode_frame(b"t", make_header(Kind.FETCH, "a", 1, 1.0, parts, fields={"c": "x"}), parts, KEY)
    for part_index in (0, 1, 2):
        original = bytes(frames[part_index])
        for bit in range(len(original) * 8):
            mutated = bytearray(original)
            mutated[bit // 8] ^= 1 << (bit % 8)
            copy = list(frames)
            copy[part_index] = bytes(mutated)
            with pytest.raises(FrameError):
                decode_frame(copy, KEY, max_payload_bytes=100)


def test_truncations_are_rejected() -> None:
    frames = encode_frame(b"t", make_header(Kind.PING, "a", 1, 1.0, []), [], KEY)
    header = bytes(frames[1])
    for n in range(len(header)):
        with pytest.raises(FrameError):
            decode_frame([b"t", header[:n]], KEY, max_payload_bytes=10)
    with pytest.raises(FrameError):
        decode_frame([b"t"], KEY, max_payload_bytes=10)


def test_specific_errors() -> None:
    frames = encode_frame(b"t", make_header(Kind.PING, "a", 1, 1.0, []), [], KEY)
    header = bytearray(frames[1])
    header[2] = 99
    with pytest.raises(VersionError):
        decode_header(b"t", bytes(header), KEY)
    with pytest.raises(SignatureError):
        decode_header(b"t", bytes(frames[1]), b"other-key")
    big = encode_header(b"t", make_header(Kind.PING, "a", 1, 1.0, [], fields={"x": "y" * 5000}), KEY)
    with pytest.raises(OversizeError):
        decode_header(b"t", big, KEY)
    parts = [b"x" * 50]
    frames = encode_frame(b"t", make_header(Kind.CHUNK, "a", 1, 1.0, parts), parts, KEY)
    with pytest.raises(OversizeError):
        decode_frame(frames, KEY, max_payload_bytes=10)


def test_payload_checks() -> None:
    parts = [b"abc"]
    header = make_header(Kind.CHUNK, "a", 1, 1.0, parts)
    check_payload(header, parts)
    with pytest.raises(FrameError):
        check_payload(header, [b"abcd"])
    with pytest.raises(SignatureError):
        check_payload(header, [b"abd"])
    check_payload(header, [b"abd"], verify_digest=False)  # the caller hashes later, off the loop


def test_encode_refuses_values_outside_the_layout() -> None:
    with pytest.raises(ValueError):
        encode_header(b"x" * 300, make_header(Kind.PING, "a", 1, 1.0, []), KEY)
    with pytest.raises(ValueError):
        encode_header(b"t", make_header(Kind.PING, "a", 2**64, 1.0, []), KEY)
