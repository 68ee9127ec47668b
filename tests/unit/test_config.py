"""fuse.yml loading: defaults, strict key checking, env expansion, search order."""

from __future__ import annotations

import re
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest

from litefspy.config import (
    Config,
    ExecCommand,
    config_from_dict,
    expand_env,
    find_config_path,
    grpc_client_address,
    grpc_listen_address,
    load_config,
    parse_config,
    parse_duration,
)
from litefspy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """\
fuse:
  dir: /mnt/litefs
data:
  dir: /var/lib/litefs
lease:
  type: static
"""


def parse(text: str, **kwargs: Any) -> Config:
    return parse_config(textwrap.dedent(text), source="fuse.yml", **kwargs)


def error_of(text: str, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, **kwargs)
    return str(info.value)


def minimal_with(extra: str) -> str:
    return MINIMAL + textwrap.dedent(extra)


# --------------------------------------------------------------------------- good files


def test_minimal_file_gets_every_default() -> None:
    cfg = parse(MINIMAL, hostname="node1")
    assert cfg.fuse.dir == "/mnt/litefs"
    assert cfg.fuse.allow_other is False
    assert cfg.fuse.debug is False
    assert cfg.data.dir == "/var/lib/litefs"
    assert cfg.data.compress is True
    assert cfg.data.retention == 600.0
    assert cfg.data.retention_monitor_interval == 60.0
    assert cfg.grpc.addr == ":20202"
    assert cfg.lease.type == "static"
    assert cfg.lease.hostname == "node1"
    assert cfg.lease.advertise_url == "http://node1:20202"
    assert cfg.lease.candidate is True
    assert cfg.lease.promote is False
    assert cfg.lease.reconnect_delay == 1.0
    assert cfg.lease.demote_delay == 10.0
    assert cfg.lease.etcd.endpoints == ()
    assert cfg.lease.etcd.ttl == 10.0
    assert cfg.exec == ()
    assert cfg.skip_sync is False
    assert cfg.strict_verify is False
    assert cfg.exit_on_error is True
    assert cfg.proxy.enabled is False
    assert cfg.proxy.max_lag == 10.0
    assert cfg.proxy.passthrough == ()
    assert cfg.proxy.always_forward == ()
    assert cfg.proxy.forward is False
    assert cfg.metrics.enabled is False
    assert cfg.log.format == "text"
    assert cfg.log.debug is False
    assert cfg.source == "fuse.yml"


def test_hostname_defaults_to_os_hostname() -> None:
    cfg = parse(MINIMAL)
    assert cfg.lease.hostname == socket.gethostname()
    assert cfg.lease.advertise_url == f"http://{socket.gethostname()}:20202"


def test_every_key_is_read() -> None:
    cfg = parse(
        """\
        fuse: {dir: /mnt/x, allow-other: true, debug: true}
        data: {dir: /data/x, compress: false, retention: 1h, retention-monitor-interval: 30s}
        grpc: {addr: "10.0.0.5:7000"}
        lease:
          type: etcd
          hostname: db-1
          advertise-url: http://db-1.internal:7000
          candidate: false
          promote: true
          reconnect-delay: 250ms
          demote-delay: 2m
          etcd:
            endpoints: [http://e1:2379, http://e2:2379]
            key: app/primary
            ttl: 5s
        exec: ./serve
        skip-sync: true
        strict-verify: true
        exit-on-error: false
        proxy:
          addr: ":8080"
          target: localhost:8081
          db: app.db
          max-lag: 3s
          passthrough: ["/static/*", "*.png"]
          always-forward: ["/admin/*"]
          forward: true
        metrics: {addr: ":9090"}
        log: {format: json, debug: true}
        """
    )
    assert cfg.fuse.allow_other and cfg.fuse.debug
    assert not cfg.data.compress
    assert cfg.data.retention == 3600.0
    assert cfg.data.retention_monitor_interval == 30.0
    assert cfg.grpc.addr == "10.0.0.5:7000"
    assert cfg.lease.type == "etcd"
    assert cfg.lease.hostname == "db-1"
    assert cfg.lease.advertise_url == "http://db-1.internal:7000"
    assert not cfg.lease.candidate and cfg.lease.promote
    assert cfg.lease.reconnect_delay == 0.25
    assert cfg.lease.demote_delay == 120.0
    assert cfg.lease.etcd.endpoints == ("http://e1:2379", "http://e2:2379")
    assert cfg.lease.etcd.key == "app/primary"
    assert cfg.lease.etcd.ttl == 5.0
    assert cfg.exec == (ExecCommand("./serve", False),)
    assert cfg.skip_sync and cfg.strict_verify and not cfg.exit_on_error
    assert cfg.proxy.enabled
    assert (cfg.proxy.addr, cfg.proxy.target, cfg.proxy.db) == (":8080", "localhost:8081", "app.db")
    assert cfg.proxy.max_lag == 3.0
    assert cfg.proxy.passthrough == ("/static/*", "*.png")
    assert cfg.proxy.always_forward == ("/admin/*",)
    assert cfg.proxy.forward
    assert cfg.metrics.enabled and cfg.metrics.addr == ":9090"
    assert cfg.log.format == "json" and cfg.log.debug


def test_advertise_url_port_follows_grpc_addr() -> None:
    cfg = parse(minimal_with("grpc: {addr: '127.0.0.1:30303'}\n"), hostname="h")
    assert cfg.lease.advertise_url == "http://h:30303"


def test_repository_example_file() -> None:
    cfg = load_config(REPO / "fuse.yml", environ={})
    assert cfg.fuse.dir == "run/primary/mnt"
    assert cfg.data.dir == "run/primary/data"
    assert cfg.lease.type == "static"
    assert cfg.lease.candidate is True
    assert cfg.lease.hostname == "primary"
    assert cfg.lease.advertise_url == "http://127.0.0.1:20202"
    assert cfg.grpc.addr == "127.0.0.1:20202"
    assert cfg.grpc.listen_address == "127.0.0.1:20202"
    assert cfg.data.retention == 600.0
    assert cfg.log.format == "text"
    assert cfg.source.endswith("fuse.yml")
    # Its comments mention ${FLY_REGION == PRIMARY_REGION} etc.: no warning, no error.
    assert cfg.warnings == ()


def test_repository_example_backup_block_parses() -> None:
    """The commented-out backup: block of fuse.yml, uncommented, is a valid config."""
    text = (REPO / "fuse.yml").read_text()
    lines = text.splitlines()
    start = lines.index("# backup:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#") or line == "#":
            break
        block.append(line[2:].split("  #", 1)[0].rstrip())
    cfg = parse(minimal_with("\n".join(block) + "\n"), hostname="h")
    assert cfg.backup.url == "s3://my-bucket/my-app"
    assert (cfg.backup.sync_interval, cfg.backup.snapshot_interval) == (1.0, 86400.0)
    assert cfg.backup.retention == 259200.0 and cfg.backup.restore_if_empty is False
    assert cfg.backup.s3_endpoint == "http://127.0.0.1:8333"
    assert cfg.backup.s3_force_path_style is True


def test_backup_url_mistakes_are_named() -> None:
    with pytest.raises(ConfigError, match=r"backup\.url: .*unknown scheme 'gs'"):
        parse(minimal_with("backup: {url: 'gs://b/p'}\n"))
    with pytest.raises(ConfigError, match=re.escape('missing required key "backup.url"')):
        parse(minimal_with("backup: {restore-if-empty: true}\n"))
    with pytest.raises(ConfigError, match=re.escape('unknown key "backup.s3.bucket"')):
        parse(minimal_with("backup: {url: 's3://b/p', s3: {bucket: x}}\n"))


def test_from_dict() -> None:
    cfg = Config.from_dict(
        {"fuse": {"dir": "/m"}, "data": {"dir": "/d"}, "lease": {"type": "static"}},
        hostname="x",
    )
    assert cfg.lease.advertise_url == "http://x:20202"
    assert cfg.source == "<dict>"
    with pytest.raises(ConfigError, match=re.escape('unknown key "fuse.dirr"')):
        config_from_dict({"fuse": {"dirr": "/m"}})


def test_empty_value_means_default() -> None:
    # An env var that expands to nothing leaves the key at its default.
    cfg = parse(minimal_with("log: {format: }\nmetrics: {addr: ${NOPE}}\n"), environ={})
    assert cfg.log.format == "text"
    assert not cfg.metrics.enabled


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("retension: 10m\n", "retension"),
        ("proxy: {adr: ':8080'}\n", "proxy.adr"),
        ("grpc: {address: ':1'}\n", "grpc.address"),
        ("log: {level: debug}\n", "log.level"),
        ("metrics: {port: 9090}\n", "metrics.port"),
        ("exec: [{cmd: x, if_candidate: true}]\n", "exec[0].if_candidate"),
    ],
)
def test_unknown_keys_are_named(extra: str, key: str) -> None:
    assert f'fuse.yml: unknown key "{key}"' in error_of(minimal_with(extra))


def test_unknown_nested_keys_are_named() -> None:
    text = MINIMAL.replace("type: static", "type: static\n  etcd: {ttll: 5s}")
    assert error_of(text).startswith('fuse.yml: unknown key "lease.etcd.ttll"')
    text = MINIMAL.replace("dir: /mnt/litefs", "dir: /mnt/litefs\n  allow_other: true")
    msg = error_of(text)
    assert 'unknown key "fuse.allow_other"' in msg
    assert 'did you mean "fuse.allow-other"' in msg


def test_unknown_key_reported_before_missing_required() -> None:
    # A misspelled section must not be reported as the missing section it was meant to be.
    msg = error_of(MINIMAL.replace("lease:", "leese:"))
    assert 'unknown key "leese"' in msg


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("data: {dir: /d}\nlease: {type: static}\n", "fuse.dir"),
        ("fuse: {dir: /m}\nlease: {type: static}\n", "data.dir"),
        ("fuse: {dir: /m}\ndata: {dir: /d}\n", "lease.type"),
        ("fuse: {dir: ''}\ndata: {dir: /d}\nlease: {type: static}\n", "fuse.dir"),
        (
            "fuse: {dir: /m}\ndata: {dir: /d}\nlease: {type: etcd, etcd: {key: k}}\n",
            "lease.etcd.endpoints",
        ),
        (
            "fuse: {dir: /m}\ndata: {dir: /d}\nlease: {type: etcd, etcd: {endpoints: [h]}}\n",
            "lease.etcd.key",
        ),
        ("exec: [{if-candidate: true}]\n" + MINIMAL, "exec[0].cmd"),
        (MINIMAL + "proxy: {addr: ':8080', db: app.db}\n", "proxy.target"),
        (MINIMAL + "proxy: {addr: ':8080', target: 'localhost:1'}\n", "proxy.db"),
    ],
)
def test_missing_required_keys_are_named(text: str, key: str) -> None:
    assert f'fuse.yml: missing required key "{key}"' in error_of(text)


def test_empty_file_is_missing_keys() -> None:
    assert 'missing required key "fuse.dir"' in error_of("")


def test_etcd_keys_optional_for_static() -> None:
    cfg = parse(MINIMAL)
    assert cfg.lease.etcd.key == ""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "lease: {type: static, candidate: maybe}",
            'lease.candidate: expected a boolean, got "maybe"',
        ),
        ("lease: {type: static, candidate: 1}", "lease.candidate: expected a boolean, got 1"),
        ("lease: {type: raft}", 'lease.type: expected "static" or "etcd", got "raft"'),
        ("lease: {type: static, hostname: [a]}", "lease.hostname: expected a string, got a list"),
        (
            "lease: {type: static, demote-delay: soon}",
            'lease.demote-delay: invalid duration "soon"',
        ),
        (
            "lease: {type: static, reconnect-delay: [1]}",
            "lease.reconnect-delay: expected a duration",
        ),
        ("lease: {type: static, etcd: {ttl: 0}}", "lease.etcd.ttl: must be greater than zero"),
        ("lease: {type: static, etcd: [x]}", "lease.etcd: expected a mapping of keys, got a list"),
        ("lease: static", 'lease: expected a mapping of keys, got "static"'),
        ("log: {format: xml}", 'log.format: expected "text" or "json", got "xml"'),
        ("data: {dir: /d, compress: 'yes please'}", "data.compress: expected a boolean"),
        ("proxy: {passthrough: /static}", "proxy.passthrough: expected a list of strings"),
        ("proxy: {always-forward: [1]}", "proxy.always-forward[0]: expected a string, got 1"),
        ("grpc: {addr: 20202}", "grpc.addr: expected a string, got 20202"),
        ("grpc: {addr: 'localhost'}", 'grpc.addr: invalid address "localhost"'),
        ("metrics: {addr: ':x'}", 'metrics.addr: invalid address ":x"'),
        ("exec: {cmd: x}", "exec: expected a command string or a list, got a mapping"),
        ("exec: [3]", "exec[0]: expected a command string or a mapping with cmd, got 3"),
        ("skip-sync: 'no thanks'", "skip-sync: expected a boolean"),
    ],
)
def test_wrong_types_are_named(extra: str, message: str) -> None:
    base = {"lease": "lease: {type: static}", "data": "data: {dir: /d}"}
    section = extra.split(":", 1)[0]
    lines = [
        "fuse: {dir: /m}",
        extra if section == "data" else base["data"],
        extra if section == "lease" else base["lease"],
    ]
    if section not in ("data", "lease"):
        lines.append(extra)
    msg = error_of("\n".join(lines) + "\n")
    assert msg.startswith("fuse.yml: ")
    assert message in msg


def test_quoted_booleans_from_expansion_are_accepted() -> None:
    cfg = parse(
        minimal_with("skip-sync: \"${R == 'x'}\"\n").replace(
            "type: static", "type: static\n  candidate: 'TRUE'"
        ),
        environ={"R": "x"},
    )
    assert cfg.skip_sync is True
    assert cfg.lease.candidate is True


def test_invalid_yaml_names_file_and_line() -> None:
    msg = error_of("fuse:\n  dir: [unclosed\n")
    assert msg.startswith("fuse.yml: invalid YAML at line")


def test_top_level_must_be_mapping() -> None:
    assert "expected a mapping" in error_of("- a\n- b\n")


def test_data_dir_inside_mount_is_rejected() -> None:
    msg = error_of("fuse: {dir: /mnt/x}\ndata: {dir: /mnt/x/data}\nlease: {type: static}\n")
    assert "data.dir" in msg and "inside" in msg


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("1m", 60.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("2h45m30.5s", 9930.5),
        ("100us", 1e-4),
        ("100µs", 1e-4),
        ("1000ns", 1e-6),
        ("10", 10.0),
        ("0.5", 0.5),
        ("0", 0.0),
        (" 3s ", 3.0),
        (7, 7.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10x", "1h1", "-1s", "ten", "1 s", "1.2.3s", "1d", -5])
def test_parse_duration_rejects_junk(text: str | int) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


def test_parse_duration_rejects_bool_and_inf() -> None:
    with pytest.raises(ConfigError):
        parse_duration(True)
    with pytest.raises(ConfigError):
        parse_duration(float("inf"))


# --------------------------------------------------------------------------- env expansion

ENV = {"APP": "myapp", "REGION": "ams", "PRIMARY_REGION": "ams", "OTHER": "fra", "EMPTY": ""}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${APP}/primary", "myapp/primary"),
        ("$APP/primary", "myapp/primary"),
        ("$APP_x", ""),  # the longest name is taken, like a shell
        ("${APP}_x", "myapp_x"),
        ("${ APP }", "myapp"),
        ("${UNSET}", ""),
        ("$UNSET!", "!"),
        ("${REGION == 'ams'}", "true"),
        ("${REGION == 'fra'}", "false"),
        ('${REGION != "fra"}', "true"),
        ('${REGION != "ams"}', "false"),
        ("${REGION == PRIMARY_REGION}", "true"),
        ("${OTHER == PRIMARY_REGION}", "false"),
        ("${OTHER != PRIMARY_REGION}", "true"),
        ("${UNSET == ''}", "true"),
        ("${EMPTY == UNSET}", "true"),
        ("${'a'=='a'}", "true"),
        ("cost: $5 and $", "cost: $5 and $"),
        ("a$", "a$"),
        ("no vars", "no vars"),
        ("${APP}${REGION}", "myappams"),
    ],
)
def test_expand_env_forms(text: str, expected: str) -> None:
    assert expand_env(text, ENV) == expected


@pytest.mark.parametrize("text", ["${APP", "${APP REGION}", "${A === 'x'}", "${1X}", "${}"])
def test_expand_env_rejects_malformed(text: str) -> None:
    with pytest.raises(ConfigError, match="line 1"):
        expand_env(text, ENV)


def test_expansion_in_a_file() -> None:
    cfg = parse(
        """\
        fuse: {dir: /litefs}
        data: {dir: /var/lib/litefs}
        lease:
          type: etcd
          hostname: ${FLY_MACHINE_ID}.vm.$FLY_APP_NAME.internal
          candidate: ${FLY_REGION == PRIMARY_REGION}
          promote: ${FLY_REGION != 'ams'}
          etcd:
            endpoints: ${ETCD_ENDPOINTS}
            key: ${FLY_APP_NAME}/primary
        """,
        environ={
            "FLY_MACHINE_ID": "m1",
            "FLY_APP_NAME": "app",
            "FLY_REGION": "fra",
            "PRIMARY_REGION": "ams",
            "ETCD_ENDPOINTS": "http://a:2379, http://b:2379",
        },
    )
    assert cfg.lease.hostname == "m1.vm.app.internal"
    assert cfg.lease.advertise_url == "http://m1.vm.app.internal:20202"
    assert cfg.lease.candidate is False
    assert cfg.lease.promote is True
    assert cfg.lease.etcd.endpoints == ("http://a:2379", "http://b:2379")
    assert cfg.lease.etcd.key == "app/primary"


def test_expansion_can_be_turned_off() -> None:
    text = MINIMAL.replace("/mnt/litefs", "/mnt/$APP")
    assert parse(text, environ=ENV).fuse.dir == "/mnt/myapp"
    assert parse(text, environ=ENV, expand_env=False).fuse.dir == "/mnt/$APP"


def test_expansion_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITEFSPY_TEST_DIR", "/mnt/fromenv")
    assert parse(MINIMAL.replace("/mnt/litefs", "${LITEFSPY_TEST_DIR}")).fuse.dir == "/mnt/fromenv"


def test_malformed_expansion_names_file() -> None:
    msg = error_of(MINIMAL + "# ${oops\n", environ={})
    assert msg.startswith("fuse.yml: line 7: unterminated")


# --------------------------------------------------------------------------- exec forms


def test_exec_string() -> None:
    cfg = parse(minimal_with("exec: ./run --port 8081\n"))
    assert cfg.exec == (ExecCommand(cmd="./run --port 8081", if_candidate=False),)


def test_exec_list_of_strings_and_mappings() -> None:
    cfg = parse(
        minimal_with(
            """\
            exec:
              - cmd: ./migrate
                if-candidate: true
              - ./serve
              - {cmd: ./worker}
            """
        )
    )
    assert cfg.exec == (
        ExecCommand("./migrate", True),
        ExecCommand("./serve", False),
        ExecCommand("./worker", False),
    )


def test_exec_empty_command_rejected() -> None:
    assert "exec[0]: empty command" in error_of(minimal_with("exec: ['  ']\n"))


# --------------------------------------------------------------------------- grpc addresses


@pytest.mark.parametrize(
    ("addr", "listen", "client"),
    [
        (":20202", "0.0.0.0:20202", "localhost:20202"),
        ("0.0.0.0:1", "0.0.0.0:1", "localhost:1"),
        ("127.0.0.1:5", "127.0.0.1:5", "127.0.0.1:5"),
        ("node1:7000", "node1:7000", "node1:7000"),
        ("[::]:20202", "[::]:20202", "localhost:20202"),
        ("[::1]:20202", "[::1]:20202", "[::1]:20202"),
    ],
)
def test_grpc_addresses(addr: str, listen: str, client: str) -> None:
    assert grpc_listen_address(addr) == listen
    assert grpc_client_address(addr) == client


def test_grpc_config_helpers() -> None:
    cfg = parse(MINIMAL)
    assert cfg.grpc.listen_address == "0.0.0.0:20202"
    assert cfg.grpc.client_address == "localhost:20202"


# --------------------------------------------------------------------------- search order


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    cwd = tmp_path / "cwd"
    home = tmp_path / "home"
    etc = tmp_path / "etc"
    for d in (cwd, home, etc):
        d.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    return {"cwd": cwd, "home": home, "etc": etc}


def write_config(directory: Path, fuse_dir: str) -> Path:
    path = directory / "fuse.yml"
    path.write_text(MINIMAL.replace("/mnt/litefs", fuse_dir))
    return path


def test_search_order(dirs: dict[str, Path]) -> None:
    system = dirs["etc"] / "fuse.yml"
    write_config(dirs["etc"], "/from-etc")
    assert find_config_path(None, system_path=system) == system
    home_file = write_config(dirs["home"], "/from-home")
    assert find_config_path(None, system_path=system) == home_file
    cwd_file = write_config(dirs["cwd"], "/from-cwd")
    assert find_config_path(None, system_path=system) == cwd_file
    explicit = write_config(dirs["etc"].parent, "/explicit")
    assert find_config_path(str(explicit), system_path=system) == explicit
    assert load_config().fuse.dir == "/from-cwd"
    assert load_config(explicit).fuse.dir == "/explicit"


def test_search_finds_nothing_lists_where_it_looked(dirs: dict[str, Path]) -> None:
    system = dirs["etc"] / "fuse.yml"
    with pytest.raises(ConfigError) as info:
        find_config_path(None, system_path=system)
    msg = str(info.value)
    for where in (dirs["cwd"] / "fuse.yml", dirs["home"] / "fuse.yml", system):
        assert str(where) in msg


def test_explicit_path_must_exist(dirs: dict[str, Path]) -> None:
    write_config(dirs["cwd"], "/from-cwd")  # an explicit path never falls back
    with pytest.raises(ConfigError, match=re.escape("config file not found: nope.yml")):
        find_config_path("nope.yml")


def test_load_config_errors_name_the_file(dirs: dict[str, Path]) -> None:
    path = dirs["cwd"] / "fuse.yml"
    path.write_text(MINIMAL + "bogus: 1\n")
    with pytest.raises(ConfigError, match=re.escape(f'{path}: unknown key "bogus"')):
        load_config(path)


def test_litefs_yml_is_found_after_every_fuse_yml(dirs: dict[str, Path]) -> None:
    system = dirs["etc"] / "fuse.yml"
    litefs_etc = dirs["etc"] / "litefs.yml"
    litefs_etc.write_text(MINIMAL.replace("/mnt/litefs", "/litefs-etc"))
    assert find_config_path(None, system_path=system) == litefs_etc
    litefs_cwd = dirs["cwd"] / "litefs.yml"
    litefs_cwd.write_text(MINIMAL.replace("/mnt/litefs", "/litefs-cwd"))
    assert find_config_path(None, system_path=system) == litefs_cwd
    # Any fuse.yml, even the system-wide one, comes before LiteFS's name.
    write_config(dirs["etc"], "/from-etc")
    assert find_config_path(None, system_path=system) == system
    litefs_cwd.unlink()
    system.unlink()
    litefs_etc.unlink()
    with pytest.raises(ConfigError) as info:
        find_config_path(None, system_path=system)
    for where in (dirs["cwd"] / "litefs.yml", dirs["home"] / "litefs.yml", litefs_etc):
        assert str(where) in str(info.value)


# --------------------------------------------------------------------------- common mistakes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "lease:\n  type: etcd\n", 'duplicate key "lease" at line 7 (first at line 5)'),
        (
            MINIMAL.replace("  type: static\n", "  type: static\n  candidate: true\n")
            + "data:\n  dir: /x\n",
            'duplicate key "data" at line 8 (first at line 3)',
        ),
        (
            MINIMAL + "proxy:\n  addr: ':8080'\n  target: a:1\n  addr: ':8081'\n",
            'duplicate key "proxy.addr" at line 10 (first at line 8)',
        ),
        (
            MINIMAL + "exec:\n  - cmd: ./a\n    cmd: ./b\n",
            'duplicate key "exec[0].cmd" at line 9 (first at line 8)',
        ),
        (
            MINIMAL.replace("type: static", "{type: static, type: etcd}").replace("\n  {", " {"),
            'duplicate key "lease.type" at line 5',
        ),
    ],
)
def test_duplicate_keys_are_rejected_with_key_and_line(text: str, message: str) -> None:
    msg = error_of(text)
    assert msg.startswith("fuse.yml: ")
    assert message in msg
    assert "\n" not in msg


def test_equal_keys_in_different_mappings_are_not_duplicates() -> None:
    cfg = parse(
        MINIMAL + "proxy: {addr: ':8080', target: 'a:1', db: app.db}\nmetrics: {addr: ':9'}\n"
    )
    assert (cfg.proxy.addr, cfg.metrics.addr) == (":8080", ":9")


def test_litefs_http_addr_gets_a_hint() -> None:
    msg = error_of(MINIMAL + "http:\n  addr: ':20202'\n")
    assert msg == 'fuse.yml: unknown key "http.addr" (litefspy calls this grpc.addr)'
    msg = error_of(MINIMAL.replace("  type: static\n", "  type: consul\n  consul: {url: x}\n"))
    assert 'unknown key "lease.consul"' in msg and '"etcd"' in msg


def test_unset_variables_are_warned_about_once_each_with_their_line() -> None:
    text = (
        MINIMAL.replace("/mnt/litefs", "/mnt/${APP_DIR}")
        + "exec: ./serve --port $PORT --name ${APP_DIR}\n"
        + "# in a comment: ${COMMENTED} and ${A == B}\n"
        + "log: {format: text}  # ${TRAILING}\n"
    )
    cfg = parse(text, environ={"EMPTY": ""})
    assert cfg.fuse.dir == "/mnt/"
    assert cfg.exec[0].cmd == "./serve --port  --name"  # YAML strips the trailing space
    assert cfg.warnings == (
        'fuse.yml: line 2: environment variable APP_DIR is not set; expanded to ""',
        'fuse.yml: line 7: environment variable PORT is not set; expanded to ""',
    )
    assert parse(text, environ={"APP_DIR": "a", "PORT": "1"}).warnings == ()
    # A variable set to "" was set on purpose: no warning.
    assert parse(MINIMAL + "exec: ./x $EMPTY\n", environ={"EMPTY": ""}).warnings == ()


@pytest.mark.parametrize("op", ["==", "!="])
def test_comparing_two_unset_variables_is_an_error(op: str) -> None:
    text = MINIMAL.replace(
        "type: static", f"type: static\n  candidate: ${{FLY_REGION {op} PRIMARY_REGION}}"
    )
    msg = error_of(text, environ={})
    assert msg.startswith(f"fuse.yml: line 7: cannot expand ${{FLY_REGION {op} PRIMARY_REGION}}")
    assert "neither FLY_REGION nor PRIMARY_REGION is set" in msg
    # One of them set is a real comparison (the unset one is warned about).
    cfg = parse(text, environ={"FLY_REGION": "ams"})
    assert cfg.lease.candidate is (op == "!=")
    assert cfg.warnings == (
        'fuse.yml: line 7: environment variable PRIMARY_REGION is not set; expanded to ""',
    )
    assert parse(text, environ={"FLY_REGION": "ams", "PRIMARY_REGION": "ams"}).lease.candidate is (
        op == "=="
    )
