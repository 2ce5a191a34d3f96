"""`trackly run` on embedded PostgreSQL and Redis, driven over HTTP only, as a client would."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from shared.process import die_with_parent
from tests.helpers import free_port, free_ports, services_up


def _run_env(data: Path, gw: int, rd: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKLY_")}
    env.update(TRACKLY_DATA_DIR=str(data), TRACKLY_GATEWAY_PORT=str(gw), TRACKLY_REDIRECT_PORT=str(rd), **extra)
    return env


def _start_run(env: dict[str, str]) -> subprocess.Popen:
    """``trackly run`` with its output appended to run.log in its data dir; it dies with the tests."""
    with open(Path(env["TRACKLY_DATA_DIR"]) / "run.log", "a") as out:
        return subprocess.Popen([sys.executable, "-m", "services.cli", "run"], env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data = tmp_path_factory.mktemp("run")
    gw, rd = free_ports()
    env = _run_env(data, gw, rd, TRACKLY_DEFAULT_TRACKER_DOMAIN=f"http://ct.localhost:{rd}")
    proc = _start_run(env)
    deadline = time.monotonic() + 60
    while not services_up(gw, rd):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise AssertionError("trackly run did not come up:\n" + (data / "run.log").read_text())
        time.sleep(0.2)
    yield {"proc": proc, "env": env, "gateway": f"http://127.0.0.1:{gw}", "redirect": f"http://127.0.0.1:{rd}",
           "data": data, "log": data / "run.log", "up_since": time.monotonic()}
    _stop(proc)  # (test_stop_within_20_seconds has, unless it did not run)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a trackly run as Ctrl-C does (it stops its services, which are in sessions of their
    own, and its embedded servers); kill it only if that takes too long."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(25)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _running(pid: str | int) -> bool:
    """Whether a process is still there; a zombie (exited, not yet reaped: a re-parented postgres
    under a PID 1 that does not reap) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def admin(stack, *args) -> dict:
    out = subprocess.run([sys.executable, "-m", "services.cli", "admin", *args], env=stack["env"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_send_click_convert_over_http(stack):
    account = admin(stack, "create-account", "--name", "E2E")
    lst = admin(stack, "create-list", "--account-id", str(account["account_id"]), "--name", "Main",
                "--phone", "+18005551234", "--short-domain", "https://sms.example.com")
    with httpx.Client(base_url=stack["gateway"] + "/api/v2", headers={"X-Api-Key": account["api_key"]}) as api, \
            httpx.Client(base_url=stack["redirect"]) as edge:
        flow(stack, account, lst, api, edge)


def test_the_urls_it_prints_answer(stack):
    """What `make run` shows a new user: each service's URL, and a page of it that answers."""
    printed = {line.split()[1]: line for line in stack["log"].read_text().splitlines()
               if line.startswith(("trackly: gateway", "trackly: redirect"))}
    assert f"{stack['gateway']}/api/v2 " in printed["gateway"] and f"{stack['redirect']} " in printed["redirect"]
    for line in printed.values():
        ready = line.partition("(ready: ")[2].rstrip(")")
        assert httpx.get(ready).status_code == 200, line


README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readmes_tour_runs_as_written(stack):
    """The README's tour, run by bash against this stack: only its ports, the CLI's path and the
    pause before the worker is asked are changed. Needs curl, as the tour does."""
    if shutil.which("curl") is None or shutil.which("bash") is None:
        pytest.skip("the tour is a bash script that uses curl")
    text = README.read_text()
    start = text.index("## A tour")
    script = text[text.index("```bash", start) + len("```bash"):]
    script = script[: script.index("```")]
    gw, rd = urlsplit(stack["gateway"]).port, urlsplit(stack["redirect"]).port
    script = (script.replace("localhost:8000", f"localhost:{gw}").replace("localhost:8001", f"localhost:{rd}")
              .replace(".venv/bin/trackly", f"{sys.executable} -m services.cli").replace("sleep 2", "sleep 6"))
    env = dict(stack["env"], PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    out = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], env=env, cwd=README.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    destination = urlsplit(lines[0])
    assert (destination.netloc, sorted(parse_qs(destination.query))) == ("shop.example.com", ["cid", "msg"])
    assert json.loads(lines[1]) == {"success": True, "status": "accepted"}
    message = json.loads(lines[2])
    assert (message["clicked"], message["click_count"], message["conversions"], message["revenue"]) == (True, 1, 1, 24.99)
    assert message["message_id"] == parse_qs(destination.query)["msg"][0]
    report = json.loads(lines[3])
    totals = {name: report["totals"][name] for name in ("sends", "clicks", "conversions", "revenue")}
    assert report["group_by"] == "offer" and totals == {"sends": 1, "clicks": 1, "conversions": 1, "revenue": 24.99}


def flow(stack, account, lst, api, edge):
    offer = api.post("/offers", json={"name": "Deal", "destination_url": "https://shop.example.com/lp?cid={click_id}&s={{sendId}}",
                                      "payout": "12.50", "external_id": "T-1"}).json()["offer"]
    link = api.post("/links", json={"externalOfferId": "T-1", "phoneNumber": "+18005551234"}).json()
    assert link["offerId"] == offer["id"]  # the external id resolved to the internal one
    sent = api.post("/send", json={"to": "+14155551234", "list_id": lst["list_id"], "body": f"Hi {link['shortUrl']}"})
    assert sent.status_code == 201
    mid = sent.json()["message_id"]
    body = api.get(f"/messages/{mid}").json()["body"]
    short = next(w for w in body.split() if w.startswith("https://sms.example.com/"))

    hop1 = edge.get("/" + short.rsplit("/", 1)[1] + "?sub1=a", headers={"Host": "sms.example.com", "User-Agent": "Mozilla/5.0 (iPhone)"})
    assert hop1.status_code == 302 and hop1.headers["cache-control"] == "private, no-store"
    assert "server" not in hop1.headers and "server" not in sent.headers  # the software is not advertised
    tracker = urlsplit(hop1.headers["location"])
    hop2 = edge.get(tracker.path + "?" + tracker.query, headers={"Host": tracker.netloc, "User-Agent": "Mozilla/5.0 (iPhone)"})
    assert hop2.status_code == 302
    dest = urlsplit(hop2.headers["location"])
    assert dest.netloc == "shop.example.com"
    query = parse_qs(dest.query)
    click_id = query["cid"][0]
    assert query["s"] == [mid] and len(click_id) == 32

    detail = wait_for(lambda: (d := api.get(f"/messages/{mid}").json())["clicked"] and d)
    assert detail and detail["click_count"] == 1 and detail["first_clicked_at"]

    pb = httpx.get(f"{stack['gateway']}/postback/{account['postback_token']}",
                   params={"clickid": click_id, "payout": "12.50", "txid": "conv-1", "network": "tune"})
    assert pb.status_code == 200 and pb.json() == {"success": True, "status": "accepted"}
    converted = wait_for(lambda: (d := api.get(f"/messages/{mid}").json())["conversions"] == 1 and d)
    assert converted and converted["revenue"] == 12.5

    report = api.get("/reports/performance", params={"group_by": "offer"}).json()
    assert report["totals"]["sends"] == 1 and report["totals"]["clicks"] == 1 and report["totals"]["revenue"] == 12.5


def test_a_child_that_dies_is_started_again(stack):
    """A child that ran and then died (a worker whose Redis restarted, a kill -9) is started again,
    as a process manager would, instead of taking everything down."""
    proc = stack["proc"]

    def worker_pids() -> list[str]:
        return subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "services.cli worker"],
                              capture_output=True, text=True).stdout.split()

    time.sleep(max(0.0, 10.5 - (time.monotonic() - stack["up_since"])))  # it has run long enough
    (old,) = worker_pids()
    os.kill(int(old), signal.SIGKILL)
    new = wait_for(lambda: [pid for pid in worker_pids() if pid != old], 15)
    assert new and proc.poll() is None, Path(stack["log"]).read_text()
    assert "worker exited with -9; restarting it in 1 s" in Path(stack["log"]).read_text()
    assert httpx.get(stack["gateway"] + "/readyz").status_code == 200


def test_a_child_that_keeps_failing_to_start_again_stops_everything(settings, tmp_path):
    """A service that ran, died, and then cannot start again (its port taken meanwhile) was
    restarted every 30 s for good while the rest served without it, and trackly run never exited
    for a process manager to see it. After RESTART_LIMIT restarts in a row that each exit at once,
    it stops everything (exit 1)."""
    gw, rd = free_ports()
    proc = _start_run(_run_env(tmp_path, gw, rd, TRACKLY_DATABASE_URL=settings.database_url,
                               TRACKLY_REDIS_URL=settings.redis_url))
    try:
        assert wait_for(lambda: services_up(gw, rd), 60), (tmp_path / "run.log").read_text()
        time.sleep(10.5)  # it has run long enough to be restarted
        (gateway,) = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "services.cli gateway"],
                                    capture_output=True, text=True).stdout.split()
        with socket.socket() as taken:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            os.kill(int(gateway), signal.SIGKILL)
            assert wait_for(lambda: _bind(taken, gw), 5)  # before its restart, 1 s later
            taken.listen()
            assert proc.wait(60) == 1
        log = (tmp_path / "run.log").read_text()
        assert "gateway exited with -9; restarting it in 1 s" in log and "restarting it in 16 s" in log
        assert "again, within 10 s of each of 5 restarts in a row; stopping" in log
        assert not _answers(f"http://127.0.0.1:{rd}/healthz")  # the rest stopped too
    finally:
        _stop(proc)


def _bind(sock: socket.socket, port: int) -> bool:
    """Whether ``sock`` could be bound to the port (free once its last holder has gone)."""
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("server", ["Redis", "PostgreSQL"])
def test_an_embedded_server_dying_stops_everything(tmp_path, server):
    """Without its Redis or its PostgreSQL nothing can work, and restarting the services cannot
    bring it back: trackly run stops (exit 1) rather than restarting the worker forever or
    answering 503 until someone looks; started again, it comes up on the same data."""
    gw, rd = free_ports()
    log = tmp_path / "run.log"
    env = _run_env(tmp_path, gw, rd)
    proc = _start_run(env)
    try:
        assert wait_for(lambda: _answers(f"http://127.0.0.1:{gw}/readyz"), 60), "trackly run did not come up"
        time.sleep(10.5)  # the services have run long enough to be restarted if they die
        if server == "Redis":
            (pid,) = subprocess.run(["pgrep", "-P", str(proc.pid), "redis-server"],
                                    capture_output=True, text=True).stdout.split()
        else:
            pid = (tmp_path / "pg" / "postmaster.pid").read_text().split()[0]
        os.kill(int(pid), signal.SIGKILL)
        proc.wait(25)
        assert proc.returncode == 1 and f"the embedded {server} exited; stopping" in log.read_text()
        if server == "Redis":
            assert not (tmp_path / "pg" / "postmaster.pid").exists()  # PostgreSQL was stopped
        proc = _start_run(env)
        assert wait_for(lambda: _answers(f"http://127.0.0.1:{gw}/readyz"), 60), log.read_text()
    finally:
        _stop(proc)


def test_kill_9_of_trackly_run_takes_its_services_with_it(tmp_path):
    """The OOM killer (or kill -9) ends trackly run without its clean-up: its services and Redis
    must still go (they get SIGTERM from the kernel), so that the next trackly run finds the ports
    free and comes up."""
    gw, rd = free_ports()
    env = _run_env(tmp_path, gw, rd)
    procs = [_start_run(env)]
    try:
        assert wait_for(lambda: _answers(f"http://127.0.0.1:{gw}/readyz"), 60), (tmp_path / "run.log").read_text()
        children = subprocess.run(["pgrep", "-P", str(procs[0].pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 4  # worker, redirect, gateway, redis-server
        procs[0].kill()
        procs[0].wait()
        assert wait_for(lambda: not [pid for pid in children if _running(pid)], 20), \
            "services outlived trackly run"
        procs.append(_start_run(env))
        assert wait_for(lambda: _answers(f"http://127.0.0.1:{gw}/readyz"), 60), (tmp_path / "run.log").read_text()
        procs[1].send_signal(signal.SIGINT)
        assert procs[1].wait(25) == 0
        # ...and stopped the PostgreSQL the killed run had started (pgserver still counted that run
        # as one of its users: it never left).
        assert wait_for(lambda: not (tmp_path / "pg" / "postmaster.pid").exists(), 10)
    finally:
        for proc in procs:
            _stop(proc)
        pid_file = tmp_path / "pg" / "postmaster.pid"
        if pid_file.exists():  # a failed run's PostgreSQL
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)


def test_stop_within_20_seconds(stack):
    proc = stack["proc"]
    # Its services and redis-server (children in sessions of their own) and its PostgreSQL (a daemon).
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 4
    children.append((stack["data"] / "pg" / "postmaster.pid").read_text().split()[0])
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in its terminal: to its whole process group
    proc.wait(25)
    assert time.monotonic() - start < 20
    log = Path(stack["log"]).read_text()
    assert proc.returncode == 0, log
    assert "Traceback" not in log  # nothing stopped under a service still using it (Redis did)
    # Nothing it started is left: children, redis-server and postgres (their own sessions too).
    time.sleep(0.5)
    leftover = [pid for pid in children if _running(pid)]
    assert leftover == []
    assert not (stack["data"] / "redis" / "redis.sock").exists() or not _redis_alive(stack["data"] / "redis" / "redis.sock")
    assert not (stack["data"] / "pg" / "postmaster.pid").exists()


def _redis_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


@pytest.mark.parametrize("service", ["gateway", "redirect"])
def test_a_standalone_service_stops_its_embedded_servers_on_sigterm(tmp_path, service):
    """`trackly gateway` (or redirect) alone starts a private PostgreSQL and Redis; SIGTERM, as a
    process manager sends it, stops them too (uvicorn re-raises the signal after its shutdown)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKLY_")}
    port = free_port()
    env.update(TRACKLY_DATA_DIR=str(tmp_path), TRACKLY_GATEWAY_PORT=str(port), TRACKLY_REDIRECT_PORT=str(port))
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", service], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent())
    try:
        assert wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 60), f"{service} did not come up"
        started = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
        assert started  # its postgres and redis-server
        proc.send_signal(signal.SIGTERM)
        proc.wait(25)
        assert wait_for(lambda: not [pid for pid in started if _running(pid)], 10)
        assert not (tmp_path / "pg" / "postmaster.pid").exists()
    finally:
        _stop(proc)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def test_trackly_run_stops_everything_on_sigterm(settings, tmp_path):
    """A process manager stops `trackly run` with SIGTERM (the e2e tests use Ctrl-C): exit 0,
    within 20 s, every service it started gone."""
    gw, rd = free_ports()
    proc = _start_run(_run_env(tmp_path, gw, rd, TRACKLY_DATABASE_URL=settings.database_url,
                               TRACKLY_REDIS_URL=settings.redis_url))
    children: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not services_up(gw, rd):
            assert proc.poll() is None and time.monotonic() < deadline, "trackly run did not come up"
            time.sleep(0.2)
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert len(children) == 3  # worker, redirect, gateway (no embedded servers: the URLs are set)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(25) == 0
        assert time.monotonic() - started < 20
        deadline = time.monotonic() + 2
        while [p for p in children if _running(p)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in children if _running(p)] == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in children:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
