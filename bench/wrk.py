"""Driving HTTP servers with ``wrk`` pinned to a core, and reading its report."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu) or `brew install wrk`"

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    bad: int  # non-2xx/3xx responses plus socket errors

    def describe(self) -> str:
        text = f"{self.rps:,.0f} req/s, p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms"
        return text + (f", {self.bad} bad responses" if self.bad else "")


def available() -> bool:
    return shutil.which("wrk") is not None


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not match:
        raise ValueError(f"unexpected wrk duration {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(output: str) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE).group(1))  # type: ignore[union-attr]
    bad = 0
    non = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non:
        bad += int(non.group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if errors:
        bad += sum(int(g) for g in errors.groups())
    return WrkResult(rps, p50, p99, requests, bad)


def paths_script(paths: list[str]) -> Path:
    """A wrk Lua script cycling through ``paths`` (one request each, in order, round and round)."""
    body = ",\n".join(f'"{p}"' for p in paths)
    script = (
        "local paths = {\n" + body + "\n}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i % #paths + 1\n"
        "  return wrk.format(nil, paths[i])\n"
        "end\n"
    )
    handle = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    with handle:
        handle.write(script)
    return Path(handle.name)


def run(
    url: str,
    *,
    host: str | None = None,
    seconds: float = 6,
    connections: int = 50,
    threads: int = 1,
    cpu: str | None = "1",
    script: Path | None = None,
    user_agent: str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148",
) -> WrkResult:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
           "-H", f"User-Agent: {user_agent}"]
    if host:
        cmd += ["-H", f"Host: {host}"]
    if script:
        cmd += ["-s", str(script)]
    cmd.append(url)
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpu, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return parse(out.stdout)
