"""Shared fixtures: the chart through Helm 4 (helm-python-sdk: Helm's Go SDK
as a C library, no helm binary and no cluster), the example values, and a
running platform (`chappe up`) to scrape."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import pytest
import yaml

import helm_python as helm

CHART = pathlib.Path(__file__).resolve().parent.parent
REPO = CHART.parent.parent
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
INVALID = sorted((CHART / "examples" / "invalid").glob("*.yaml"))
# Test-only values: paths the examples do not take (a draining region,
# external NATS, every monitoring object on).
TEST_VALUES = sorted((CHART / "tests" / "values").glob("*.yaml"))
RELEASE = "chappe-operator"
NAMESPACE = "chappe-system"


def load_values(path: pathlib.Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def expectations(path: pathlib.Path) -> list[str]:
    """The `# expect: ...` lines of an invalid values file."""
    return [line.split("# expect: ", 1)[1] for line in path.read_text().splitlines() if line.startswith("# expect: ")]


@pytest.fixture(scope="session")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def render_docs(chart, values: dict, *, name: str = RELEASE, namespace: str = NAMESPACE) -> list[dict]:
    """Every object the chart renders for `values` (hooks included, NOTES
    excluded), as dicts, each with its template's path under `_template`."""
    out = chart.render(values=values, name=name, namespace=namespace, is_install=True, revision=1)
    docs = []
    for template, text in sorted(out.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["_template"] = template
                docs.append(doc)
    return docs


def strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "_template"}


@pytest.fixture(scope="session")
def rendered(chart) -> dict[str, list[dict]]:
    """Rendered objects of every example and test values file, by file name."""
    return {p.name: render_docs(chart, load_values(p)) for p in EXAMPLES + TEST_VALUES}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Platform:
    gateway: str
    metrics_url: str
    bin_dir: pathlib.Path
    workdir: pathlib.Path

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()


def chappe_bin() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("CHAPPE_BIN", REPO / "target" / "debug" / "chappe"))
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"no chappe binary at {path}: build it with `cargo build -p chappe-cli --bin chappe`, "
            "or point CHAPPE_BIN at one",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def platform():
    """`chappe up` on free loopback ports in a temporary directory, stopped at the end."""
    binary = chappe_bin()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="chappe-chart-test-"))
    listen = f"127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    log = open(workdir / "up.log", "w+")
    proc = subprocess.Popen(
        [str(binary), "up", "--data-dir", str(workdir / "data"), "--listen", listen, "--metrics-listen", metrics],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=workdir,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    banner = re.compile(r"metrics: (http://\S+/metrics)")
    url = None
    while time.monotonic() < deadline and url is None:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"chappe up exited with {proc.returncode}:\n{log.read()}", pytrace=False)
        log.seek(0)
        m = banner.search(log.read())
        url = m.group(1) if m else None
        time.sleep(0.2)
    if url is None:
        proc.kill()
        pytest.fail("chappe up printed no metrics address within 60 s", pytrace=False)
    try:
        yield Platform(gateway=f"http://{listen}", metrics_url=url, bin_dir=binary.parent, workdir=workdir)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def round_trip(chart, platform) -> subprocess.CompletedProcess:
    """The `helm test` round-trip Pod's script, run against the local platform
    with the local `chappe` on PATH: two devices exchange a message. Its
    traffic also gives the platform's histograms and per-label counters their
    first samples before the scrape."""
    docs = render_docs(chart, load_values(CHART / "examples" / "one-node.yaml"))
    (pod,) = [d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"].endswith("test-round-trip")]
    container = pod["spec"]["containers"][0]
    assert container["command"][:2] == ["bash", "-c"]
    script = container["command"][2]
    env = {e["name"]: e["value"] for e in container["env"]}
    home = platform.workdir / "helm-test-home"
    tmp = platform.workdir / "helm-test-tmp"
    tmp.mkdir()
    # The Pod writes to /tmp (its emptyDir); here a directory of our own.
    script = script.replace("/tmp/", f"{tmp}/")
    env.update(
        GATEWAY_A=platform.gateway,
        GATEWAY_B=platform.gateway,
        CHAPPE_HOME=str(home),
        HOME=str(platform.workdir),
        DEADLINE_SECONDS="60",
        PATH=f"{platform.bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
