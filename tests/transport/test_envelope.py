"""The envelope: every header that is not exactly right raises EnvelopeError (never anything
else), and the correlation id comes back whenever it could be read, so that the receiver can
still answer the caller with an error instead of leaving it to its deadline."""

import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.envelope import (MAX_CORR, MAX_HEADER_BYTES, MAX_NAME_LEN, PROTOCOL_VERSION,
                                Envelope, EnvelopeError, Kind, pack_header, unpack_header)

GOOD = [PROTOCOL_VERSION, int(Kind.CALL), 42, "caller", "echo-1", "echo", 5000, 0]


def header(**changes):
    """A packed header: GOOD with the named fields replaced."""
    names = ["version", "kind", "corr", "sender", "target", "method", "deadline_ms", "credit"]
    fields = [changes.get(name, value) for name, value in zip(names, GOOD)]
    return msgpack.packb(fields, use_bin_type=True)


def rejection(data) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        unpack_header(data)
    return info.value


# -- round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind):
    env = Envelope(kind, 7, "a", "b", "m", 1000, 16)
    assert unpack_header(pack_header(env)) == env


def test_extreme_but_valid_values_round_trip():
    env = Envelope(Kind.STREAM, MAX_CORR, "s" * MAX_NAME_LEN, "t" * MAX_NAME_LEN,
                   "m" * MAX_NAME_LEN, (1 << 31) - 1, (1 << 31) - 1)
    assert unpack_header(pack_header(env)) == env
    assert unpack_header(pack_header(Envelope(Kind.HEARTBEAT))) == Envelope(Kind.HEARTBEAT)


def test_unicode_names_round_trip():
    env = Envelope(Kind.TELL, 1, "acteur-é", "演员", "méthode")
    assert unpack_header(pack_header(env)) == env


def test_a_header_in_a_buffer_is_accepted():
    data = pack_header(Envelope(Kind.CALL, 3, "a", "b", "c"))
    assert unpack_header(memoryview(data)).corr == 3


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(list(Kind)), corr=st.integers(0, MAX_CORR),
       names=st.lists(st.text(max_size=MAX_NAME_LEN // 4), min_size=3, max_size=3),
       deadline=st.integers(0, (1 << 31) - 1), credit=st.integers(0, (1 << 31) - 1))
def test_any_valid_envelope_round_trips(kind, corr, names, deadline, credit):
    env = Envelope(kind, corr, *names, deadline, credit)
    assert unpack_header(pack_header(env)) == env


# -- each rule -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, PROTOCOL_VERSION + 100, -1, "1", None, True, 1.0, [1]])
def test_a_wrong_protocol_version_is_rejected_naming_both_versions(version):
    exc = rejection(header(version=version))
    assert "protocol version" in str(exc) and str(PROTOCOL_VERSION) in str(exc)
    assert exc.corr == 42


@pytest.mark.parametrize("kind", [0, 12, 99, 255, 256, -1, 1 << 40, "CALL", None, True, 1.0])
def test_an_unknown_kind_is_rejected(kind):
    exc = rejection(header(kind=kind))
    assert "unknown message kind" in str(exc)
    assert exc.corr == 42


@pytest.mark.parametrize("corr", [-1, MAX_CORR + 1, (1 << 64) - 1, "42", None, True, 4.2, [42]])
def test_a_bad_correlation_id_is_rejected(corr):
    exc = rejection(header(corr=corr))
    assert "correlation id" in str(exc)
    assert exc.corr is None


@pytest.mark.parametrize("field", ["sender", "target", "method"])
@pytest.mark.parametrize("value", [7, None, True, 1.5, ["x"], {"x": 1}, b"bytes"])
def test_a_name_that_is_not_a_string_is_rejected(field, value):
    exc = rejection(header(**{field: value}))
    assert field in str(exc) and "string" in str(exc)
    assert exc.corr == 42 and exc.kind == Kind.CALL


@pytest.mark.parametrize("field", ["sender", "target", "method"])
def test_a_name_over_the_length_limit_is_rejected(field):
    exc = rejection(header(**{field: "x" * (MAX_NAME_LEN + 1)}))
    assert field in str(exc) and str(MAX_NAME_LEN) in str(exc)
    assert exc.corr == 42 and exc.kind == Kind.CALL


@pytest.mark.parametrize("field", ["deadline_ms", "credit"])
@pytest.mark.parametrize("value", [-1, 1 << 31, 1 << 62, "5", None, True, 2.5])
def test_a_bad_deadline_or_credit_is_rejected(field, value):
    exc = rejection(header(**{field: value}))
    assert field in str(exc) and repr(value) in str(exc)
    assert exc.corr == 42 and exc.kind == Kind.CALL


@pytest.mark.parametrize("fields", [
    GOOD[:7], GOOD + [0], [], GOOD[:1], tuple(GOOD[:3]),
], ids=["7 fields", "9 fields", "empty array", "1 field", "3 fields"])
def test_a_header_that_is_not_an_array_of_eight_is_rejected(fields):
    rejection(msgpack.packb(fields))


@pytest.mark.parametrize("value", [
    {"version": 1}, 1, "header", None, b"\x01" * 8, 1.5,
], ids=["map", "int", "str", "nil", "bin", "float"])
def test_a_header_that_is_not_an_array_is_rejected(value):
    exc = rejection(msgpack.packb(value, use_bin_type=True))
    assert exc.corr is None


def test_a_header_over_max_header_bytes_is_rejected_before_parsing():
    data = header() + b"\x00" * MAX_HEADER_BYTES
    exc = rejection(data)
    assert str(MAX_HEADER_BYTES) in str(exc) and exc.corr is None


@pytest.mark.parametrize("data", [
    b"", b"\x98", b"\xc1", header()[:-1], header() + b"\x00", b"\x98" + b"\xc0" * 8,
    b"\x98\xdd\xff\xff\xff\xff", b"\x91" * 4000, b"\x81\xa0" * 2000,
], ids=["empty", "truncated array", "reserved byte", "truncated header", "trailing byte",
        "nils", "huge nested array", "deeply nested arrays", "deeply nested maps"])
def test_malformed_msgpack_is_rejected(data):
    rejection(data)


def test_an_extension_type_in_a_header_is_rejected():
    fields = list(GOOD)
    fields[3] = msgpack.ExtType(5, b"x")
    rejection(msgpack.packb(fields))


@settings(max_examples=2000, deadline=None)
@given(data=st.binary(max_size=MAX_HEADER_BYTES + 16))
def test_random_bytes_raise_only_envelope_error(data):
    try:
        env = unpack_header(data)
    except EnvelopeError:
        return
    assert isinstance(env, Envelope)  # the rare valid header


@settings(max_examples=2000, deadline=None)
@given(position=st.integers(0, 200), byte=st.integers(0, 255), cut=st.integers(0, 200))
def test_mutated_valid_headers_raise_only_envelope_error(position, byte, cut):
    data = bytearray(header())
    data[position % len(data)] = byte
    try:
        env = unpack_header(bytes(data[:max(cut, 1)]))
    except EnvelopeError:
        return
    assert isinstance(env.kind, Kind) and 0 <= env.corr <= MAX_CORR


def test_os_random_headers_are_rejected():
    for _ in range(2000):
        try:
            unpack_header(os.urandom(int.from_bytes(os.urandom(1), "big")))
        except EnvelopeError:
            pass
