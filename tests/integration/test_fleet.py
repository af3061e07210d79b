"""A fleet on a real Ray cluster on this machine: a head and three worker "nodes" (each a raylet
offering ``fission_host``, so each gets a host agent with its own state dir), real QEMU VMs, and
two front ends (``fission serve --cluster``) on Unix sockets. One cluster serves the module; the
tests run in order: runs spread, a sandbox is shared by the front ends, a paused sandbox moves,
a node dies, a node joins.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import FISSION, vmm_processes

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

HOST_BUDGET_MB = 4096  # one warm python VM (1,120 MB reserved) and two sandboxes per host
LOST_WITHIN = 15.0  # seconds for a dead node's sandboxes to show as lost


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll ``condition`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def streamed(answer: httpx.Response) -> dict[str, Any]:
    """The closing NDJSON line of a streamed run, with its stdout lines joined in."""
    assert answer.status_code == 200, answer.text
    lines = [json.loads(line) for line in answer.text.strip().splitlines()]
    stdout = "".join(
        line["data"] for line in lines if line["type"] == "output" and line["stream"] == "stdout"
    )
    return lines[-1] | {"stdout": stdout}


class FrontEnd:
    """A ``fission serve --cluster`` process on a Unix socket (local callers need no key)."""

    def __init__(self, root: Path, name: str, address: str, fleet_root: Path) -> None:
        self.dir = root / name
        self.dir.mkdir()
        self.socket = self.dir / "api.sock"
        argv = [FISSION, "serve", "--cluster", address, "--socket", str(self.socket)]
        argv += ["--state-dir", str(self.dir / "state"), "--fleet-root", str(fleet_root)]
        argv += ["--pool", "python=1", "--memory-budget", str(HOST_BUDGET_MB)]
        argv += ["--db", str(self.dir / "keys.db")]
        self.log_path = self.dir / "serve.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://fission",
            timeout=180,
        )
        wait_for(self._healthy, f"front end {name} to answer ({self.log_path})", timeout=90)

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            return self.http.get("/v1/health").status_code == 200
        except httpx.HTTPError:
            return False

    def run(self, code: str) -> dict[str, Any]:
        """A one-shot python run: its closing line (result or error) with ``stdout`` joined."""
        return streamed(self.http.post("/v1/run", json={"language": "python", "code": code}))

    def sandbox_run(self, sandbox_id: str, code: str) -> dict[str, Any]:
        """Run code in a sandbox, as ``run``."""
        return streamed(self.http.post(f"/v1/sandboxes/{sandbox_id}/run", json={"code": code}))

    def cluster(self) -> dict[str, Any]:
        """``GET /v1/cluster``."""
        answer = self.http.get("/v1/cluster")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def stop(self) -> None:
        """SIGTERM, by pid."""
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class Fleet:
    """The cluster, its fleet root and the two front ends."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fleet_root = root / "fleet"
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        self.nodes = [self.add_node() for _ in range(3)]
        ray.init(address=self.cluster.address, namespace="fission", log_to_driver=False)
        self.front_ends: list[FrontEnd] = []

    def start(self) -> None:
        """Both front ends up, and a host agent on each worker node."""
        self.a = FrontEnd(self.root, "a", self.cluster.address, self.fleet_root)
        self.front_ends.append(self.a)
        self.b = FrontEnd(self.root, "b", self.cluster.address, self.fleet_root)
        self.front_ends.append(self.b)
        wait_for(lambda: len(self.alive_hosts()) == 3, "three host agents", timeout=120)

    def add_node(self) -> Any:
        """A worker node offering one fission host."""
        return self.cluster.add_node(num_cpus=1, resources={"fission_host": 1})

    def alive_hosts(self) -> list[dict[str, Any]]:
        """The hosts ``GET /v1/cluster`` shows alive, with their reports."""
        hosts = self.a.cluster()["hosts"]
        return [h for h in hosts if h["alive"] and h["memory_budget_mb"] is not None]

    def host_of(self, sandbox_id: str) -> str:
        """The host a sandbox lives on (the control actor's catalog)."""
        control = ray.get_actor("fission-fleet", namespace="fission")
        return str(ray.get(control.get.remote(sandbox_id))["host"])

    def node_of(self, host: str) -> Any:
        """The cluster node a host runs on."""
        return next(n for n in self.nodes if host == f"node-{n.node_id[:12]}")

    def close(self) -> None:
        """Front ends, the fleet's VMs, then the cluster; VMM processes left by a killed node."""
        for front_end in self.front_ends:
            front_end.stop()
        try:
            control = ray.get_actor("fission-fleet", namespace="fission")
            ray.get(control.shutdown.remote(), timeout=120)
        except ValueError:
            pass  # no front end got as far as creating it
        ray.shutdown()
        self.cluster.shutdown()
        for pid in vmm_processes(self.fleet_root):  # a killed node's VMs: its machine "died"
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    root = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp"))
    made = Fleet(root)
    try:
        made.start()
        yield made
    finally:
        made.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """The fleet's VMs live under its own root for the module; ``Fleet.close`` ends them."""
    yield


def served(fleet: Fleet) -> dict[str, int]:
    """Runs each host's python pool has served."""
    return {
        h["name"]: sum(p["served"] for p in h["pools"] if p["language"] == "python")
        for h in fleet.alive_hosts()
    }


def test_one_shot_runs_spread_over_the_hosts(fleet: Fleet) -> None:
    wait_for(lambda: all(p["ready"] for h in fleet.alive_hosts() for p in h["pools"]), "warm pools")
    before = served(fleet)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(fleet.a.run, [f"print({n} * 7)" for n in range(3)]))
    assert [(r.get("exit_code"), r["stdout"]) for r in results] == [
        (0, "0\n"),
        (0, "7\n"),
        (0, "14\n"),
    ], results

    def reported() -> dict[str, int] | None:
        now = served(fleet)
        return now if sum(now.values()) - sum(before.values()) >= 3 else None

    after = wait_for(reported, "the hosts' reports of the runs")
    busy = [host for host in after if after[host] > before.get(host, 0)]
    assert len(busy) >= 2, f"all runs went to one host: {before} -> {after}"
    shown = subprocess.run(
        [FISSION, "cluster", "status", "--json", "--address", fleet.cluster.address],
        capture_output=True,
        timeout=120,
        check=True,
    )
    status = json.loads(shown.stdout)
    assert status["alive"] == 3 and {h["name"] for h in status["hosts"]} == set(after)


def test_a_sandbox_made_on_one_front_end_is_reachable_on_another(fleet: Fleet) -> None:
    created = fleet.a.http.post("/v1/sandboxes", json={"language": "python"})
    assert created.status_code == 201, created.text
    sandbox_id = created.json()["id"]
    try:
        got = fleet.b.http.get(f"/v1/sandboxes/{sandbox_id}")
        assert got.status_code == 200 and got.json()["state"] == "running"
        wrote = fleet.b.sandbox_run(sandbox_id, "open('/tmp/n', 'w').write('41')")
        assert wrote["exit_code"] == 0, wrote
        read = fleet.a.sandbox_run(sandbox_id, "print(int(open('/tmp/n').read()) + 1)")
        assert read["exit_code"] == 0 and read["stdout"] == "42\n", read
        listed = fleet.b.http.get("/v1/sandboxes").json()["sandboxes"]
        assert sandbox_id in [s["id"] for s in listed]
    finally:
        assert fleet.b.http.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
    assert fleet.a.http.get(f"/v1/sandboxes/{sandbox_id}").status_code == 404


def test_a_paused_sandbox_resumes_on_another_host_with_its_files(fleet: Fleet) -> None:
    sandbox_id = fleet.a.http.post("/v1/sandboxes", json={"language": "python"}).json()["id"]
    home = fleet.host_of(sandbox_id)
    upload = fleet.a.http.put(
        f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/tmp/kept.txt"}, content=b"intact"
    )
    assert upload.status_code == 200, upload.text
    assert fleet.a.http.post(f"/v1/sandboxes/{sandbox_id}/pause").json()["state"] == "paused"
    subprocess.run(
        [FISSION, "cluster", "drain", home, "--address", fleet.cluster.address],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        resumed = fleet.b.http.post(f"/v1/sandboxes/{sandbox_id}/resume")
        assert resumed.status_code == 200 and resumed.json()["state"] == "running", resumed.text
        moved_to = fleet.host_of(sandbox_id)
        assert moved_to != home
        kept = fleet.b.http.get(
            f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/tmp/kept.txt"}
        )
        assert kept.content == b"intact"
        assert fleet.b.sandbox_run(sandbox_id, "print('still here')")["stdout"] == "still here\n"
    finally:
        subprocess.run(
            [FISSION, "cluster", "drain", home, "--undo", "--address", fleet.cluster.address],
            check=True,
            capture_output=True,
            timeout=120,
        )
        fleet.a.http.delete(f"/v1/sandboxes/{sandbox_id}")


def test_a_dead_node_loses_its_sandboxes_and_runs_go_on_elsewhere(fleet: Fleet) -> None:
    boxes = [
        fleet.a.http.post("/v1/sandboxes", json={"language": "python"}).json()["id"]
        for _ in range(2)
    ]
    victim_host = fleet.host_of(boxes[0])
    victim = fleet.node_of(victim_host)
    on_victim = [b for b in boxes if fleet.host_of(b) == victim_host]
    fleet.cluster.remove_node(victim, allow_graceful=False)  # its raylet and workers killed
    fleet.nodes.remove(victim)
    killed = time.monotonic()

    def lost(sandbox_id: str) -> dict[str, Any] | None:
        record = dict(fleet.b.http.get(f"/v1/sandboxes/{sandbox_id}").json())
        return record if record["state"] == "lost" else None

    for sandbox_id in on_victim:
        record = wait_for(
            lambda sid=sandbox_id: lost(sid), f"sandbox {sandbox_id} lost", timeout=LOST_WITHIN
        )
        assert victim_host in record["lost_reason"] and "died at" in record["lost_reason"]
    assert time.monotonic() - killed < LOST_WITHIN
    hosts = {h["name"]: h for h in fleet.a.cluster()["hosts"]}
    assert not hosts[victim_host]["alive"] and hosts[victim_host]["lost_at"] is not None
    for n in range(3):
        result = fleet.b.run(f"print({n})")
        assert result.get("exit_code") == 0, result
    for sandbox_id in boxes:
        assert fleet.a.http.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204


def test_a_node_that_joins_takes_work(fleet: Fleet) -> None:
    old = {h["name"] for h in fleet.alive_hosts()}
    holding = [
        fleet.a.http.post("/v1/sandboxes", json={"language": "python"}).json()["id"] for _ in old
    ]  # one on each old host: the newcomer has the most room
    fleet.nodes.append(fleet.add_node())
    wait_for(lambda: len(fleet.alive_hosts()) == len(old) + 1, "the new host", timeout=120)
    (newcomer,) = {h["name"] for h in fleet.alive_hosts()} - old
    created = fleet.b.http.post("/v1/sandboxes", json={"language": "python"}).json()["id"]
    try:
        assert fleet.host_of(created) == newcomer
        assert fleet.a.sandbox_run(created, "print('new')")["stdout"] == "new\n"
    finally:
        for sandbox_id in [*holding, created]:
            fleet.a.http.delete(f"/v1/sandboxes/{sandbox_id}")
