"""The embedded Redis: one server per data directory, found by every process that uses it."""
from __future__ import annotations

from pathlib import Path

import redis

from shared.embedded import EmbeddedRedis


def test_a_long_data_dir_still_has_one_server_that_every_process_finds(tmp_path: Path) -> None:
    """A data directory too long for a unix socket path puts the socket in the temp dir, under a
    name derived from the data directory: a second process (``trackly admin republish`` beside
    ``trackly run``) attaches to the running server instead of starting another one on the same
    append-only file."""
    data = tmp_path / ("d" * 100) / "redis"
    first, second = EmbeddedRedis(data), EmbeddedRedis(data)
    other = EmbeddedRedis(tmp_path / ("e" * 100) / "redis")
    assert first.socket == second.socket != other.socket
    first.start()
    try:
        assert first.socket.parent.stat().st_mode & 0o777 == 0o700
        second.start()
        assert second.process is None  # attached, not started
        redis.Redis(unix_socket_path=str(second.socket)).set("k", "v")
        second.stop()  # not its server: nothing stops
        assert redis.Redis(unix_socket_path=str(first.socket)).get("k") == b"v"
    finally:
        first.stop()
    assert not first.socket.parent.exists()  # its directory in the temp dir is gone with it
