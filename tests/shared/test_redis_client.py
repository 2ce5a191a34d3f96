"""shared.redis_client.create_redis: commands packed by hiredis, with redis-py's own meaning."""
from __future__ import annotations

import hiredis
import pytest
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from shared.redis_client import create_redis

ARGUMENTS = [
    ("SET", "key", b"raw bytes"),
    ("SET", "key", "caf\u00e9 \u2603"),
    ("SET", "key", 42),
    ("SET", "key", -7),
    ("SET", "key", 10**30),
    ("SET", "key", 0.1),
    ("SET", "key", 1e20),
    ("SET", "key", float("inf")),
    ("SET", "key", memoryview(b"view")),
    ("CONFIG GET", "append*"),  # a command name of two words is sent as two arguments
    (b"CONFIG GET", b"append*"),
    ("MSET", *(item for i in range(1000) for item in (f"trk:s:sms.example.com:c{i:06d}", b'{"k":"Ab3kX9"}'))),
]


@pytest.mark.parametrize("url, base", [
    ("redis://127.0.0.1:6379/0", Connection),
    ("unix:///tmp/trackly-test-redis.sock", UnixDomainSocketConnection),
])
def test_commands_are_packed_by_hiredis_as_redis_py_packs_them(url: str, base: type) -> None:
    client = create_redis(url)
    cls = client.connection_pool.connection_class
    assert issubclass(cls, base)  # the URL's kind of connection is kept
    ours, theirs = cls(), base()
    for args in ARGUMENTS:
        packed = b"".join(ours.pack_command(*args))
        assert packed == b"".join(theirs.pack_command(*args)), args[:3]
    # Packed in one C call, not argument by argument in Python:
    big = ARGUMENTS[-1]
    assert ours.pack_command(*big) == [hiredis.pack_command(big)]


@pytest.mark.parametrize("bad", [None, True, ["a list"], {"a": "dict"}])
def test_a_value_redis_cannot_take_is_refused_as_redis_py_refuses_it(bad: object) -> None:
    connection = create_redis("redis://127.0.0.1:6379/0").connection_pool.connection_class()
    with pytest.raises(DataError):
        connection.pack_command("SET", "key", bad)
    with pytest.raises(DataError):
        Connection().pack_command("SET", "key", bad)


async def test_a_big_mset_reads_back(redis) -> None:
    values = {f"test:packing:{i}": f"value {i} \u2603".encode() for i in range(1000)}
    await redis.mset(values)
    try:
        assert await redis.mget(list(values)) == list(values.values())
    finally:
        await redis.delete(*values)
