"""The lean heartbeat source reads Redis's replies itself: whatever way the bytes are cut by the
network, it hands over exactly the replies sent, in order, and a closed or erroring connection is
an error (the source reconnects), never a hang. A real socket pair, no Redis needed."""

import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.observe.redis_heartbeats import Resp2Reader

FRAMES = [
    (b"*3\r\n$10\r\npsubscribe\r\n$20\r\n/0.celeryev/worker.*\r\n:1\r\n", [b"psubscribe", b"/0.celeryev/worker.*", 1]),
    (b"*4\r\n$8\r\npmessage\r\n$1\r\np\r\n$1\r\nc\r\n$11\r\n{\"a\": \"\r\n\"}\r\n",
     [b"pmessage", b"p", b"c", b'{"a": "\r\n"}']),  # CRLF inside a bulk string is data
    (b"*2\r\n$4\r\npong\r\n$0\r\n\r\n", [b"pong", b""]),
    (b"*4\r\n$8\r\npmessage\r\n$-1\r\n+OK\r\n$3\r\n\x00\xff\n\r\n", [b"pmessage", None, b"OK", b"\x00\xff\n"]),
]


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 1000])
def test_replies_come_whole_however_the_bytes_are_cut(pair, cut):
    ours, redis_side = pair
    reader = Resp2Reader(ours)
    stream = b"".join(f for f, _ in FRAMES) * 3
    got = []
    for i in range(0, len(stream), cut):
        redis_side.sendall(stream[i:i + cut])
        time.sleep(0.001)
        got += reader.read_available()
    got += reader.read_available()
    assert got == [v for _, v in FRAMES] * 3
    assert reader.buf == b""


def test_wait_one_waits_for_the_rest_and_times_out(pair):
    ours, redis_side = pair
    reader = Resp2Reader(ours)
    redis_side.sendall(FRAMES[0][0][:10])
    with pytest.raises(TimeoutError):
        reader.wait_one(time.monotonic() + 0.2)
    redis_side.sendall(FRAMES[0][0][10:])
    assert reader.wait_one(time.monotonic() + 2) == FRAMES[0][1]


def test_an_error_or_a_closed_connection_raises(pair):
    ours, redis_side = pair
    reader = Resp2Reader(ours)
    redis_side.sendall(b"-NOPERM this user has no permissions to access one of the channels\r\n")
    time.sleep(0.05)
    with pytest.raises(ConnectionError, match="NOPERM"):
        reader.read_available()
    redis_side.close()
    time.sleep(0.05)
    reader.buf = b""
    with pytest.raises(ConnectionError, match="closed"):
        reader.read_available()


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=300)), min_size=1, max_size=8),
       st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=20))
def test_any_messages_cut_anywhere(pair, messages, cuts):
    ours, redis_side = pair
    reader = Resp2Reader(ours)
    reader.buf = b""
    stream = b"".join(b"*4\r\n" + _bulk(b"pmessage") + _bulk(b"/0.celeryev/worker.*") + _bulk(ch) + _bulk(data)
                      for ch, data in messages)
    got, pos, i = [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        redis_side.sendall(stream[pos:pos + step])
        pos, i = pos + step, i + 1
        deadline = time.monotonic() + 1
        while True:  # until the kernel has handed over what was sent
            got += reader.read_available()
            if len(b"".join(_frame(g) for g in got)) + len(reader.buf) >= min(pos, len(stream)) or \
                    time.monotonic() > deadline:
                break
    assert got == [[b"pmessage", b"/0.celeryev/worker.*", ch, data] for ch, data in messages]
    assert reader.buf == b""


def _frame(reply: list) -> bytes:
    return b"*4\r\n" + b"".join(_bulk(x) for x in reply)
