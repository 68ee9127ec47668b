"""Install and deploy: the wheel on its own in a fresh venv, the container image
(only where a container runtime answers), and the examples/ kept valid."""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

from litefspy.config import load_config
from litefspy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

FLY_ENV = {
    "FLY_MACHINE_ID": "148e272c6d5589",
    "FLY_APP_NAME": "my-app",
    "PRIMARY_REGION": "ams",
    "ETCD_ENDPOINTS": "http://my-etcd.internal:2379",
}


# --------------------------------------------------------------------------- examples


def test_every_example_config_is_covered_here() -> None:
    found = sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.yml"))
    assert found == [
        "docker/fuse.yml",
        "etcd/docker-compose.yml",
        "fly/fuse.yml",
        "systemd/fuse.yml",
    ]


def test_fly_example_primary_region_and_replica_region() -> None:
    path = EXAMPLES / "fly" / "fuse.yml"
    primary = load_config(path, environ={**FLY_ENV, "FLY_REGION": "ams"})
    assert primary.warnings == ()
    assert primary.lease.type == "etcd"
    assert primary.lease.candidate is True
    assert primary.lease.hostname == "148e272c6d5589.vm.my-app.internal"
    assert primary.lease.advertise_url == "http://148e272c6d5589.vm.my-app.internal:20202"
    assert primary.lease.etcd.endpoints == ("http://my-etcd.internal:2379",)
    assert primary.lease.etcd.key == "my-app/primary"
    assert primary.grpc.listen_address == "[::]:20202"  # Fly's private network is IPv6
    assert primary.proxy.enabled and primary.proxy.db == "app.db"
    assert [c.if_candidate for c in primary.exec] == [True, False]
    replica = load_config(path, environ={**FLY_ENV, "FLY_REGION": "fra"})
    assert replica.lease.candidate is False
    # Off Fly, the region comparison of two unset variables is refused, not "true".
    with pytest.raises(ConfigError, match="neither FLY_REGION nor PRIMARY_REGION is set"):
        load_config(path, environ={})


def test_fly_toml_matches_its_fuse_yml() -> None:
    fly = tomllib.loads((EXAMPLES / "fly" / "fly.toml").read_text())
    cfg = load_config(EXAMPLES / "fly" / "fuse.yml", environ={**FLY_ENV, "FLY_REGION": "ams"})
    service = fly["http_service"]
    assert f":{service['internal_port']}" == cfg.proxy.addr  # Fly's proxy -> litefspy's proxy
    assert fly["mounts"]["destination"] == cfg.data.dir  # the volume holds the data
    assert service["checks"][0]["path"] == "/litefs/health"
    dockerfile = (EXAMPLES / "fly" / fly["build"]["dockerfile"]).read_text()
    assert "COPY fuse.yml /etc/fuse.yml" in dockerfile  # where `litefspy mount` looks


def test_docker_example() -> None:
    cfg = load_config(EXAMPLES / "docker" / "fuse.yml", environ={"HOSTNAME": "c0ffee"})
    assert cfg.warnings == ()
    assert cfg.lease.type == "static" and cfg.lease.candidate is True
    assert cfg.lease.advertise_url == "http://c0ffee:20202"
    assert cfg.data.dir == "/var/lib/litefs"
    assert "VOLUME /var/lib/litefs" in (REPO / "Dockerfile").read_text()


def test_systemd_unit_runs_mount_with_its_example_config() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((EXAMPLES / "systemd" / "litefspy.service").read_text())
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert Path(argv[0]).name == "litefspy"
    assert argv[1] == "mount"
    assert argv[2] == "-config" and Path(argv[3]).name == "fuse.yml"
    assert unit["Service"]["KillSignal"] == "SIGTERM"  # the graceful handoff
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    endpoints = "http://etcd-1:2379,http://etcd-2:2379,http://etcd-3:2379"
    cfg = load_config(EXAMPLES / "systemd" / "fuse.yml", environ={"ETCD_ENDPOINTS": endpoints})
    assert cfg.warnings == ()
    assert cfg.lease.type == "etcd"
    assert cfg.lease.etcd.endpoints == tuple(endpoints.split(","))
    assert cfg.metrics.enabled


def test_etcd_compose_members_agree_on_the_cluster() -> None:
    compose = yaml.safe_load((EXAMPLES / "etcd" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert sorted(services) == ["etcd-1", "etcd-2", "etcd-3"]
    flags: dict[str, dict[str, str]] = {}
    for name, service in services.items():
        args = dict(a.split("=", 1) for a in service["command"][1:])
        assert args["--name"] == name
        flags[name] = args
    cluster = {
        m.split("=", 1)[0]: m.split("=", 1)[1]
        for m in flags["etcd-1"]["--initial-cluster"].split(",")
    }
    assert sorted(cluster) == sorted(services)
    for name, args in flags.items():
        assert args["--initial-cluster"] == flags["etcd-1"]["--initial-cluster"]
        assert args["--initial-advertise-peer-urls"] == cluster[name]
        assert services[name]["image"].startswith("quay.io/coreos/etcd:v3.")
    # Host ports as the README gives them to lease.etcd.endpoints.
    readme = (EXAMPLES / "etcd" / "README.md").read_text()
    for service in services.values():
        host_port = service["ports"][0].split(":")[0]
        assert f"http://127.0.0.1:{host_port}" in readme


# --------------------------------------------------------------------------- the wheel


def _clean_env() -> dict[str, str]:
    # The test run points PYTHONPATH at the source tree: the fresh venv must not see it.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        argv,
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return res


@pytest.mark.slow
def test_wheel_builds_and_runs_alone_in_a_fresh_venv(tmp_path: Path) -> None:
    """`pip install .` without dev tools: build the wheel, install it (dependencies
    from PyPI) into a venv of its own, and use the `litefspy` it installs."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "litefspy", src / "litefspy", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = tmp_path / "dist"
    res = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
        tmp_path,
    )
    assert res.returncode == 0, f"building the wheel failed:\n{res.stdout}\n{res.stderr}"
    (wheel,) = dist.glob("litefspy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "litefspy/py.typed",
        "litefspy/v1/replication_pb2.py",
        "litefspy/v1/replication_pb2.pyi",
        "litefspy/v1/replication_pb2_grpc.py",
        "litefspy/v1/admin_pb2_grpc.py",
        "litefspy/ltx/encoder.py",
    ):
        assert needed in names, f"{needed} missing from {wheel.name}"
    assert not [n for n in names if n.startswith(("tests/", "bench/", "scripts/"))]

    venv = tmp_path / "venv"
    res = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    assert res.returncode == 0, res.stderr
    python = venv / "bin" / "python"
    res = _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", str(wheel)],
        tmp_path,
    )
    assert res.returncode == 0, f"installing the wheel failed:\n{res.stdout}\n{res.stderr}"

    litefspy = venv / "bin" / "litefspy"
    res = _run([str(litefspy), "--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "mount" in res.stdout and "status" in res.stdout
    res = _run([str(python), "-c", "import litefspy; print(litefspy.__file__)"], tmp_path)
    assert res.stdout.startswith(str(venv)), res.stdout  # the installed copy, not the tree
    res = _run([str(python), "-c", "import pytest"], tmp_path)
    assert res.returncode != 0, "a runtime install must not bring the dev tools"
    # ...and no module of litefspy may need one of them (or anything undeclared).
    import_all = (
        "import importlib, pkgutil, litefspy\n"
        "for m in pkgutil.walk_packages(litefspy.__path__, 'litefspy.'):\n"
        "    if m.name != 'litefspy.__main__':\n"
        "        importlib.import_module(m.name)\n"
    )
    res = _run([str(python), "-c", import_all], tmp_path)
    assert res.returncode == 0, f"a module does not import from the wheel alone:\n{res.stderr}"

    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(os.urandom(300),) for _ in range(50)])
    conn.commit()
    conn.close()
    ltx = tmp_path / "snapshot.ltx"
    res = _run([str(litefspy), "ltx", "encode-db", str(db), str(ltx), "--compress"], tmp_path)
    assert res.returncode == 0, res.stderr
    res = _run([str(litefspy), "ltx", "verify", str(ltx)], tmp_path)
    assert res.returncode == 0, res.stderr
    corrupt = tmp_path / "corrupt.ltx"
    data = bytearray(ltx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    res = _run([str(litefspy), "ltx", "verify", str(corrupt)], tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and "corrupt.ltx" in res.stderr


# --------------------------------------------------------------------------- the image


def _container_runtime() -> str:
    for name in ("docker", "podman"):
        tool = shutil.which(name)
        if tool is None:
            continue
        res = subprocess.run(
            [tool, "info"], capture_output=True, text=True, timeout=60, check=False
        )
        if res.returncode == 0:
            return tool
        reason = (res.stderr.strip().splitlines() or ["no answer"])[-1]
        pytest.skip(f"{name} is installed but does not answer ({reason})")
    pytest.skip("no container runtime (docker or podman) on this machine")


@pytest.mark.slow
def test_container_image_mounts_and_serves() -> None:
    """The Dockerfile's image runs `litefspy mount` with /dev/fuse and SYS_ADMIN."""
    tool = _container_runtime()
    tag = f"litefspy-test:{uuid.uuid4().hex[:12]}"
    res = subprocess.run(
        [tool, "build", "-q", "-t", tag, str(REPO)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert res.returncode == 0, f"image build failed:\n{res.stdout}\n{res.stderr}"
    name = f"litefspy-test-{uuid.uuid4().hex[:12]}"
    # AppArmor's default container profile forbids mounting, FUSE included.
    apparmor_on = Path("/sys/module/apparmor/parameters/enabled")
    on = apparmor_on.exists() and apparmor_on.read_text().strip() == "Y"
    apparmor = ["--security-opt", "apparmor=unconfined"] if on else []
    try:
        res = subprocess.run(
            [
                tool, "run", "-d", "--name", name, "--hostname", "primary",
                "--device", "/dev/fuse", "--cap-add", "SYS_ADMIN", *apparmor,
                "-v", f"{EXAMPLES / 'docker' / 'fuse.yml'}:/etc/fuse.yml:ro",
                tag,
            ],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr

        def in_container(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [tool, "exec", name, *argv], capture_output=True, text=True, timeout=60, check=False
            )

        deadline = time.monotonic() + 60
        while in_container("test", "-e", "/litefs/.lag").returncode != 0:
            logs = subprocess.run([tool, "logs", name], capture_output=True, text=True, check=False)
            assert time.monotonic() < deadline, f"no mount in the container:\n{logs.stderr[-3000:]}"
            time.sleep(0.5)
        write = (
            "import sqlite3; c = sqlite3.connect('/litefs/app.db'); "
            "c.execute('CREATE TABLE t (x)'); c.execute('INSERT INTO t VALUES (1)'); c.commit()"
        )
        assert in_container("python", "-c", write).returncode == 0
        res = in_container("litefspy", "status", "--json")
        assert res.returncode == 0, res.stderr
        st = json.loads(res.stdout)
        assert st["role"] == "primary"
        assert [d["name"] for d in st["databases"]] == ["app.db"]
        assert in_container("cat", "/litefs/app.db-pos").stdout.startswith("0000000000000001/")
    finally:
        # -v: the image's anonymous data volume goes too.
        subprocess.run(
            [tool, "rm", "-f", "-v", name], capture_output=True, timeout=120, check=False
        )
        subprocess.run([tool, "rmi", "-f", tag], capture_output=True, timeout=120, check=False)


# --------------------------------------------------------------------------- make run / make test


def _make_plan(target: str) -> str:
    # -n: print, do not run; -B: as if nothing were installed yet (a fresh machine).
    # Not the flags of a `make test` this may run under.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    res = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", "-C", str(REPO), target],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_make_run_installs_only_what_running_needs() -> None:
    plan = _make_plan("run")
    apt = [line for line in plan.splitlines() if "apt-install.sh" in line]
    assert len(apt) == 1 and "fuse3" in apt[0] and "libfuse3-dev" in apt[0]
    for test_only in ("etcd-server", "nftables", "sqlite3", "rsync"):
        assert test_only not in plan
    assert 'pip install -q -e "."' in plan
    assert "[dev]" not in plan
    assert plan.rstrip().splitlines()[-1].endswith("-m litefspy.cli.devrun")


def test_make_test_adds_the_test_packages_and_dev_extras() -> None:
    plan = _make_plan("test")
    apt = " ".join(line for line in plan.splitlines() if "apt-install.sh" in line)
    for package in ("fuse3", "etcd-server", "nftables", "iproute2", "rsync", "sqlite3"):
        assert package in apt
    assert 'pip install -q -e ".[dev]"' in plan
    assert "pytest" in plan.rstrip().splitlines()[-1]
