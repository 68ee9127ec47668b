"""Load and validate `fuse.yml` (the key table lives in docs/INTERFACE.md).

The file is YAML. Before parsing, environment references are expanded in the
raw text (`${VAR}`, `$VAR`, `${VAR == 'x'}`, `${VAR != "x"}`, `${A == B}`), so
one file can serve every node of a cluster (Fly.io style). Every key is
checked: an unknown or misspelled key, a key given twice, a missing required
key or a value of the wrong type is a `ConfigError` naming the file and the
full dotted key, because a silently ignored setting in a replication system
means data goes somewhere the operator did not intend. A variable that is
unset where it is expanded is not an error (it may be meant to be empty), but
it is reported in `Config.warnings`, which `litefspy mount` logs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import socket
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from litefspy.errors import BackupError, ConfigError

__all__ = [
    "DEFAULT_GRPC_ADDR",
    "Config",
    "DataConfig",
    "EtcdConfig",
    "ExecCommand",
    "FuseConfig",
    "GRPCConfig",
    "LeaseConfig",
    "LogConfig",
    "MetricsConfig",
    "ProxyConfig",
    "config_from_dict",
    "expand_env",
    "find_config_path",
    "grpc_client_address",
    "grpc_listen_address",
    "load_config",
    "parse_config",
    "parse_duration",
    "split_host_port",
]

CONFIG_FILENAME = "fuse.yml"
# LiteFS's name for the same file: found when no fuse.yml is, so a LiteFS
# deployment's config works as it is.
LITEFS_CONFIG_FILENAME = "litefs.yml"
SYSTEM_CONFIG_PATH = Path("/etc") / CONFIG_FILENAME
DEFAULT_GRPC_ADDR = ":20202"
LEASE_TYPES = ("static", "etcd")
LOG_FORMATS = ("text", "json")


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class FuseConfig:
    """`fuse:` the mount point the applications use."""

    dir: str
    allow_other: bool = False
    debug: bool = False


@dataclass(frozen=True)
class DataConfig:
    """`data:` where the real files and LTX history live."""

    dir: str
    compress: bool = True
    retention: float = 600.0
    retention_monitor_interval: float = 60.0


@dataclass(frozen=True)
class GRPCConfig:
    """`grpc:` the node-to-node and CLI API address (`host:port`, host optional)."""

    addr: str = DEFAULT_GRPC_ADDR

    @property
    def listen_address(self) -> str:
        """Address for the server to bind, e.g. `0.0.0.0:20202`."""
        return grpc_listen_address(self.addr)

    @property
    def client_address(self) -> str:
        """Address a client on this machine dials, e.g. `localhost:20202`."""
        return grpc_client_address(self.addr)


@dataclass(frozen=True)
class EtcdConfig:
    """`lease.etcd:` the etcd cluster and key that hold the primary lease."""

    endpoints: tuple[str, ...] = ()
    key: str = ""
    ttl: float = 10.0


@dataclass(frozen=True)
class LeaseConfig:
    """`lease:` how this node learns who the primary is."""

    type: str
    hostname: str
    advertise_url: str
    candidate: bool = True
    promote: bool = False
    reconnect_delay: float = 1.0
    demote_delay: float = 10.0
    etcd: EtcdConfig = field(default_factory=EtcdConfig)


@dataclass(frozen=True)
class ExecCommand:
    """One `exec` entry: a shell command run once the node is ready."""

    cmd: str
    if_candidate: bool = False


@dataclass(frozen=True)
class ProxyConfig:
    """`proxy:` the optional HTTP proxy in front of the application (off when addr is empty)."""

    addr: str = ""
    target: str = ""
    db: str = ""
    max_lag: float = 10.0
    passthrough: tuple[str, ...] = ()
    always_forward: tuple[str, ...] = ()
    forward: bool = False

    @property
    def enabled(self) -> bool:
        """True when `proxy.addr` is set."""
        return bool(self.addr)


@dataclass(frozen=True)
class MetricsConfig:
    """`metrics:` the Prometheus endpoint (off when addr is empty)."""

    addr: str = ""

    @property
    def enabled(self) -> bool:
        """True when `metrics.addr` is set."""
        return bool(self.addr)


@dataclass(frozen=True)
class BackupConfig:
    """`backup:` continuous backup to object storage (off when url is empty)."""

    url: str = ""
    sync_interval: float = 1.0
    snapshot_interval: float = 86400.0
    retention: float = 259200.0
    restore_if_empty: bool = False
    s3_endpoint: str = ""
    s3_region: str = ""
    s3_force_path_style: bool = False

    @property
    def enabled(self) -> bool:
        """True when `backup.url` is set."""
        return bool(self.url)


@dataclass(frozen=True)
class LogConfig:
    """`log:` output format and verbosity."""

    format: str = "text"
    debug: bool = False


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole validated `fuse.yml`; `source` names the file it came from."""

    fuse: FuseConfig
    data: DataConfig
    grpc: GRPCConfig = field(default_factory=GRPCConfig)
    lease: LeaseConfig
    exec: tuple[ExecCommand, ...] = ()
    skip_sync: bool = False
    strict_verify: bool = False
    exit_on_error: bool = True
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "<string>"
    # Problems that do not stop the node (an unset environment variable), one
    # line each, naming the file and line; `litefspy mount` logs them.
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "<dict>",
        hostname: str | None = None,
    ) -> Config:
        """Validate an already-parsed mapping (same rules as the YAML file)."""
        return config_from_dict(data, source=source, hostname=hostname)


# --------------------------------------------------------------------------- search & load


def find_config_path(explicit: str | None, *, system_path: Path = SYSTEM_CONFIG_PATH) -> Path:
    """Return the config file to use: `explicit` (-c PATH), else the first existing
    of `./fuse.yml`, `~/fuse.yml`, `/etc/fuse.yml`, then LiteFS's names
    `./litefs.yml`, `~/litefs.yml`, `/etc/litefs.yml`.

    `system_path` exists so tests need not touch /etc (LiteFS's name is looked
    for next to it).
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file not found: {explicit}")
        return path
    candidates = [
        Path.cwd() / CONFIG_FILENAME,
        Path.home() / CONFIG_FILENAME,
        system_path,
        Path.cwd() / LITEFS_CONFIG_FILENAME,
        Path.home() / LITEFS_CONFIG_FILENAME,
        system_path.with_name(LITEFS_CONFIG_FILENAME),
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"no config file found (looked in {looked}); pass -c PATH")


def load_config(
    path: str | Path | None = None,
    *,
    expand_env: bool = True,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Find (see `find_config_path`), read and validate a config file."""
    found = find_config_path(None if path is None else str(path))
    try:
        text = found.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{found}: cannot read config file: {exc}") from exc
    return parse_config(text, source=str(found), expand_env=expand_env, environ=environ)


def parse_config(
    text: str,
    *,
    source: str = "<string>",
    expand_env: bool = True,
    environ: Mapping[str, str] | None = None,
    hostname: str | None = None,
) -> Config:
    """Expand environment references (unless disabled), parse YAML and validate.

    `environ` defaults to `os.environ`; `hostname` (default: the OS hostname)
    is what `lease.hostname` falls back to.
    """
    warnings: list[str] = []
    if expand_env:
        try:
            text = _expand_env(text, os.environ if environ is None else environ, warnings)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    try:
        raw = _load_yaml(text, source)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    config = config_from_dict(raw, source=source, hostname=hostname)
    if not warnings:
        return config
    return dataclasses.replace(config, warnings=tuple(f"{source}: {w}" for w in warnings))


def _load_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load`, except that a key given twice in one mapping is a ConfigError.

    PyYAML silently keeps the last of two equal keys; LiteFS (Go's yaml.v3)
    rejects the file, and so does litefspy: one of the two values was meant
    and the reader cannot tell which.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, "", source, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_duplicate_keys(node: yaml.Node, path: str, source: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias to a node already checked (or to itself)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{path}[{index}]", source, seen)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _YAML_MERGE_TAG:
            continue
        name = str(key_node.value)
        dotted = f"{path}.{name}" if path else name
        line = key_node.start_mark.line + 1
        if name in first_line:
            raise ConfigError(
                f'{source}: duplicate key "{dotted}" at line {line} (first at line '
                f"{first_line[name]}): give each key once"
            )
        first_line[name] = line
        _check_duplicate_keys(value_node, dotted, source, seen)


_YAML_MERGE_TAG = "tag:yaml.org,2002:merge"


# --------------------------------------------------------------------------- env expansion

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_NAME_RE = re.compile(_NAME)
_OPERAND = rf"(?:'[^']*'|\"[^\"]*\"|{_NAME})"
_EXPR_RE = re.compile(rf"\s*({_OPERAND})\s*(==|!=)\s*({_OPERAND})\s*")
_VAR_RE = re.compile(rf"\s*({_NAME})\s*")


def expand_env(text: str, environ: Mapping[str, str], warnings: list[str] | None = None) -> str:
    """Expand `${VAR}`, `$VAR` and the comparisons `${A == B}` / `${A != B}`.

    Operands of a comparison are variable names or quoted literals ('x' or
    "x"); the comparison becomes `true` or `false`. Unset variables are empty
    strings, and each one expanded outside a YAML comment adds one line to
    `warnings` (the first line it is used on). A comparison of two variables
    that are both unset (`${FLY_REGION == PRIMARY_REGION}` off Fly.io) is a
    ConfigError: "" == "" would make it silently true, e.g. every node a
    candidate. A `$` not followed by a name or `{` is left alone. A malformed
    `${...}` is a ConfigError (with its line) rather than silently kept, since
    it is almost always a typo in the file.
    """
    return _expand_env(text, environ, warnings)


class _Expansion:
    """Where one reference is: its line, whether it is inside a YAML comment, and
    the unset variables reported so far (each once)."""

    def __init__(
        self, environ: Mapping[str, str], warnings: list[str] | None, reported: set[str]
    ) -> None:
        self.environ = environ
        self.warnings = warnings
        self.reported = reported
        self.line = 1
        self.in_comment = False

    def value(self, name: str) -> str:
        value = self.environ.get(name)
        if value is not None:
            return value
        if not self.in_comment and self.warnings is not None and name not in self.reported:
            self.reported.add(name)
            self.warnings.append(
                f'line {self.line}: environment variable {name} is not set; expanded to ""'
            )
        return ""


def _expand_env(text: str, environ: Mapping[str, str], warnings: list[str] | None = None) -> str:
    ctx = _Expansion(environ, warnings, set())
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        j = text.find("$", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        ctx.line = text.count("\n", 0, j) + 1
        ctx.in_comment = _in_yaml_comment(text[text.rfind("\n", 0, j) + 1 : j])
        if j + 1 < n and text[j + 1] == "{":
            end = text.find("}", j + 2)
            if end < 0:
                raise ConfigError(f"line {ctx.line}: unterminated ${{ in environment expansion")
            out.append(_expand_braced(text[j + 2 : end], ctx))
            i = end + 1
            continue
        match = _NAME_RE.match(text, j + 1)
        if match is None:
            out.append("$")
            i = j + 1
            continue
        out.append(ctx.value(match.group(0)))
        i = match.end()
    return "".join(out)


def _expand_braced(body: str, ctx: _Expansion) -> str:
    var = _VAR_RE.fullmatch(body)
    if var is not None:
        return ctx.value(var.group(1))
    expr = _EXPR_RE.fullmatch(body)
    if expr is None:
        raise ConfigError(
            f"line {ctx.line}: cannot expand ${{{body}}}: expected ${{VAR}}, "
            "${VAR == 'value'}, ${VAR != 'value'} or ${VAR1 == VAR2}"
        )
    left_token, right_token = expr.group(1), expr.group(3)
    unset = [t for t in (left_token, right_token) if t[0] not in "'\"" and t not in ctx.environ]
    if len(unset) == 2 and not ctx.in_comment:
        raise ConfigError(
            f"line {ctx.line}: cannot expand ${{{body.strip()}}}: neither {unset[0]} nor "
            f"{unset[1]} is set (two unset variables are not taken as equal); set them, or "
            "compare with a quoted value "
            f"(${{{unset[0]} == 'value'}})"
        )
    left = _operand_value(left_token, ctx)
    right = _operand_value(right_token, ctx)
    equal = left == right
    return "true" if equal == (expr.group(2) == "==") else "false"


def _operand_value(token: str, ctx: _Expansion) -> str:
    if token[0] in "'\"":
        return token[1:-1]
    return ctx.value(token)


def _in_yaml_comment(line_before: str) -> bool:
    """Whether a `$` preceded on its line by `line_before` sits in a YAML comment.

    A `#` starts a comment at the start of a line or after whitespace, outside
    quotes; a quote opens a quoted scalar only where a value can start (after
    `:`, `-`, `[`, `{`, `,` or at the start), so the apostrophe of `don't`
    does not. A quoted value spanning lines is not followed: a reference on its
    second line counts as outside a comment, which errs towards warning.
    """
    quote = ""
    last = ""  # the last non-space character outside quotes
    prev = " "
    i = 0
    while i < len(line_before):
        c = line_before[i]
        if quote:
            if quote == '"' and c == "\\":
                i += 2
                continue
            if c == quote:
                quote = ""
                last = c
        elif c == "#" and prev.isspace():
            return True
        elif c in "'\"" and last in ("", ":", "-", "[", "{", ",", "?"):
            quote = c
        elif not c.isspace():
            last = c
        prev = c
        i += 1
    return False


# --------------------------------------------------------------------------- durations

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_PLAIN_NUMBER_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_duration(text: str | int | float) -> float:
    """Parse a Go-style duration into seconds.

    Accepts `10s`, `1m`, `1h30m`, `250ms`, `1.5s`, `0`, and plain numbers
    (int, float or numeric string), which mean seconds. Negative or
    malformed values raise ConfigError.
    """
    if isinstance(text, bool):
        raise ConfigError(f"invalid duration {text!r}")
    if isinstance(text, int | float):
        value = float(text)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"invalid duration {text!r}: must be a finite number >= 0")
        return value
    if not isinstance(text, str):
        raise ConfigError(f"invalid duration {text!r}")
    stripped = text.strip()
    if _PLAIN_NUMBER_RE.fullmatch(stripped):
        return float(stripped)
    total = 0.0
    pos = 0
    while pos < len(stripped):
        match = _DURATION_PART_RE.match(stripped, pos)
        if match is None:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not stripped or pos != len(stripped):
        raise ConfigError(
            f'invalid duration "{text}": use a number with a unit, e.g. "250ms", "10s", "1h30m"'
        )
    return total


# --------------------------------------------------------------------------- grpc addresses


def split_host_port(addr: str) -> tuple[str, int]:
    """Split `host:port`, `:port` or `[v6]:port`; ConfigError when the port is missing/invalid."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f'invalid address "{addr}": expected HOST:PORT or :PORT')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def grpc_listen_address(addr: str) -> str:
    """Turn a configured address into one a gRPC server binds: `:20202` -> `0.0.0.0:20202`."""
    host, port = split_host_port(addr)
    return _join_host_port(host or "0.0.0.0", port)


def grpc_client_address(addr: str) -> str:
    """Turn a configured address into one a client on this machine dials.

    An empty or wildcard host (`:20202`, `0.0.0.0:20202`, `[::]:20202`) means
    "this machine", so the client dials `localhost:20202`.
    """
    host, port = split_host_port(addr)
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    return _join_host_port(host, port)


# --------------------------------------------------------------------------- validation

_TOP_KEYS = (
    "fuse",
    "data",
    "grpc",
    "lease",
    "exec",
    "skip-sync",
    "strict-verify",
    "exit-on-error",
    "proxy",
    "metrics",
    "backup",
    "log",
)
_SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "fuse": ("dir", "allow-other", "debug"),
    "data": ("dir", "compress", "retention", "retention-monitor-interval"),
    "grpc": ("addr",),
    "lease": (
        "type",
        "hostname",
        "advertise-url",
        "candidate",
        "promote",
        "reconnect-delay",
        "demote-delay",
        "etcd",
    ),
    "lease.etcd": ("endpoints", "key", "ttl"),
    "proxy": ("addr", "target", "db", "max-lag", "passthrough", "always-forward", "forward"),
    "metrics": ("addr",),
    "backup": (
        "url",
        "sync-interval",
        "snapshot-interval",
        "retention",
        "restore-if-empty",
        "s3",
    ),
    "backup.s3": ("endpoint", "region", "force-path-style"),
    "log": ("format", "debug"),
    "exec[]": ("cmd", "if-candidate"),
}


# LiteFS keys that litefspy spells differently or does not have: the unknown
# key error says so instead of a did-you-mean guess.
_LITEFS_HINTS = {
    "http": "litefspy calls http.addr grpc.addr",
    "http.addr": "litefspy calls this grpc.addr",
    "lease.consul": 'litefspy has no Consul lease: use lease.type "etcd" (lease.etcd) or "static"',
    "tracing": "litefspy has no trace file; log.debug logs every transaction",
    "backup.type": "litefspy backs up to backup.url (file:// or s3://), not LiteFS Cloud",
    "backup.auth-token": "litefspy backs up to backup.url (file:// or s3://), not LiteFS Cloud",
}


class _Section:
    """Typed access to one mapping of the file, with its dotted prefix for messages.

    Unknown keys are rejected as soon as the section is opened, before any
    value is checked, so a misspelled key is reported as such rather than as
    the required key it was meant to be.
    """

    def __init__(
        self, data: Mapping[Any, Any], prefix: str, source: str, known: Sequence[str]
    ) -> None:
        self.data = data
        self.prefix = prefix
        self.source = source
        self.known = tuple(known)
        for raw_key, value in data.items():
            name = str(raw_key)
            if name in self.known:
                continue
            raise ConfigError(f"{source}: {self._unknown(name, value)}")

    def _unknown(self, name: str, value: Any) -> str:
        dotted = self.key(name)
        if isinstance(value, Mapping):
            # `http: {addr: ...}`: name the LiteFS key itself when there is a hint for it.
            for child in value:
                if f"{dotted}.{child}" in _LITEFS_HINTS:
                    dotted = f"{dotted}.{child}"
                    break
        if dotted in _LITEFS_HINTS:
            return f'unknown key "{dotted}" ({_LITEFS_HINTS[dotted]})'
        hint = difflib.get_close_matches(name, self.known, n=1, cutoff=0.6)
        suggestion = f' (did you mean "{self.key(hint[0])}"?)' if hint else ""
        return f'unknown key "{dotted}"{suggestion}'

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key(name)}: {message}")

    def missing(self, name: str, why: str = "") -> ConfigError:
        return ConfigError(f'{self.source}: missing required key "{self.key(name)}"{why}')

    def get(self, name: str) -> Any:
        assert name in self.known, name  # a key read here must be declared in the schema
        return self.data.get(name)

    def section(self, name: str, schema: str) -> _Section:
        value = self.get(name)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise self.error(name, f"expected a mapping of keys, got {_describe(value)}")
        return _Section(value, self.key(name) + ".", self.source, _SECTION_KEYS[schema])

    def string(self, name: str, default: str | None = None) -> str:
        """A string; `default=None` makes the key required (and non-empty)."""
        value = self.get(name)
        if value is None:
            if default is None:
                raise self.missing(name)
            return default
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_describe(value)}")
        if default is None and not value.strip():
            raise self.missing(name, " (it is empty)")
        return value

    def choice(self, name: str, choices: Sequence[str], default: str | None = None) -> str:
        value = self.string(name, default)
        if value not in choices:
            allowed = " or ".join(f'"{c}"' for c in choices)
            raise self.error(name, f"expected {allowed}, got {_describe(value)}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        # A quoted "${FOO == 'x'}" arrives as a string; accept its two results.
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise self.error(name, f"expected a boolean, got {_describe(value)}")

    def duration(self, name: str, default: float, *, positive: bool = False) -> float:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise self.error(name, f"expected a duration, got {_describe(value)}")
        try:
            seconds = parse_duration(value)
        except ConfigError as exc:
            raise self.error(name, str(exc)) from None
        if positive and seconds <= 0:
            raise self.error(name, f"must be greater than zero, got {_describe(value)}")
        return seconds

    def string_list(self, name: str, *, split_commas: bool = False) -> tuple[str, ...]:
        value = self.get(name)
        if value is None:
            return ()
        if isinstance(value, str) and split_commas:
            # Lets one env var carry several values: endpoints: ${ETCD_ENDPOINTS}
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if not isinstance(value, list):
            raise self.error(name, f"expected a list of strings, got {_describe(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(
                    f"{self.source}: {self.key(name)}[{index}]: expected a string, "
                    f"got {_describe(item)}"
                )
        return tuple(value)

    def address(self, name: str, default: str) -> str:
        value = self.string(name, default)
        if value:
            try:
                split_host_port(value)
            except ConfigError as exc:
                raise self.error(name, str(exc)) from None
        return value


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def config_from_dict(
    data: Mapping[str, Any],
    *,
    source: str = "<dict>",
    hostname: str | None = None,
) -> Config:
    """Validate a parsed config mapping (YAML keys, dashes and all) into a `Config`.

    `hostname` (default: the OS hostname) is what `lease.hostname` falls back to.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    top = _Section(data, "", source, _TOP_KEYS)

    fuse_s = top.section("fuse", "fuse")
    fuse = FuseConfig(
        dir=fuse_s.string("dir"),
        allow_other=fuse_s.boolean("allow-other", False),
        debug=fuse_s.boolean("debug", False),
    )

    data_s = top.section("data", "data")
    data_cfg = DataConfig(
        dir=data_s.string("dir"),
        compress=data_s.boolean("compress", True),
        retention=data_s.duration("retention", 600.0),
        retention_monitor_interval=data_s.duration(
            "retention-monitor-interval", 60.0, positive=True
        ),
    )
    _check_dirs(fuse.dir, data_cfg.dir, source)

    grpc = GRPCConfig(addr=top.section("grpc", "grpc").address("addr", DEFAULT_GRPC_ADDR))
    lease = _parse_lease(top.section("lease", "lease"), split_host_port(grpc.addr)[1], hostname)

    proxy_s = top.section("proxy", "proxy")
    proxy = ProxyConfig(
        addr=proxy_s.address("addr", ""),
        target=proxy_s.string("target", ""),
        db=proxy_s.string("db", ""),
        max_lag=proxy_s.duration("max-lag", 10.0, positive=True),
        passthrough=proxy_s.string_list("passthrough"),
        always_forward=proxy_s.string_list("always-forward"),
        forward=proxy_s.boolean("forward", False),
    )
    if proxy.enabled:
        for name in ("target", "db"):
            if not getattr(proxy, name).strip():
                raise proxy_s.missing(name, " (needed when proxy.addr is set)")

    return Config(
        fuse=fuse,
        data=data_cfg,
        grpc=grpc,
        lease=lease,
        exec=_parse_exec(top),
        skip_sync=top.boolean("skip-sync", False),
        strict_verify=top.boolean("strict-verify", False),
        exit_on_error=top.boolean("exit-on-error", True),
        proxy=proxy,
        metrics=MetricsConfig(addr=top.section("metrics", "metrics").address("addr", "")),
        backup=_parse_backup(top.section("backup", "backup")),
        log=_parse_log(top.section("log", "log")),
        source=source,
    )


def _check_dirs(fuse_dir: str, data_dir: str, source: str) -> None:
    # The data dir holds the files behind the mount: inside the mount, every
    # access would re-enter the daemon itself and deadlock.
    mount = Path(os.path.abspath(fuse_dir))
    data = Path(os.path.abspath(data_dir))
    if data == mount or mount in data.parents:
        raise ConfigError(
            f"{source}: data.dir ({data_dir}) must not be fuse.dir ({fuse_dir}) or inside it"
        )


def _parse_lease(lease_s: _Section, grpc_port: int, hostname: str | None) -> LeaseConfig:
    lease_type = lease_s.choice("type", LEASE_TYPES)
    host = lease_s.string("hostname", "") or hostname or socket.gethostname()
    advertise_url = lease_s.string("advertise-url", "") or f"http://{host}:{grpc_port}"

    etcd_s = lease_s.section("etcd", "lease.etcd")
    is_etcd = lease_type == "etcd"
    endpoints = etcd_s.string_list("endpoints", split_commas=True)
    if is_etcd and not endpoints:
        raise etcd_s.missing("endpoints", " (lease.type is etcd)")
    key = etcd_s.string("key", "")
    if is_etcd and not key.strip():
        raise etcd_s.missing("key", " (lease.type is etcd)")
    etcd = EtcdConfig(endpoints=endpoints, key=key, ttl=etcd_s.duration("ttl", 10.0, positive=True))

    return LeaseConfig(
        type=lease_type,
        hostname=host,
        advertise_url=advertise_url,
        candidate=lease_s.boolean("candidate", True),
        promote=lease_s.boolean("promote", False),
        reconnect_delay=lease_s.duration("reconnect-delay", 1.0),
        demote_delay=lease_s.duration("demote-delay", 10.0),
        etcd=etcd,
    )


def _parse_backup(backup_s: _Section) -> BackupConfig:
    s3 = backup_s.section("s3", "backup.s3")
    cfg = BackupConfig(
        url=backup_s.string("url", ""),
        sync_interval=backup_s.duration("sync-interval", 1.0, positive=True),
        snapshot_interval=backup_s.duration("snapshot-interval", 86400.0, positive=True),
        retention=backup_s.duration("retention", 259200.0, positive=True),
        restore_if_empty=backup_s.boolean("restore-if-empty", False),
        s3_endpoint=s3.string("endpoint", ""),
        s3_region=s3.string("region", ""),
        s3_force_path_style=s3.boolean("force-path-style", False),
    )
    if cfg.url:
        try:
            backup_target_spec(cfg)
        except BackupError as exc:
            raise backup_s.error("url", str(exc)) from None
    elif cfg.restore_if_empty:
        raise backup_s.missing("url", " (needed for restore-if-empty)")
    return cfg


def backup_target_spec(cfg: BackupConfig) -> TargetSpec:
    """The parsed `backup.url` with `backup.s3.*`."""
    return parse_target(
        cfg.url,
        endpoint=cfg.s3_endpoint,
        region=cfg.s3_region,
        force_path_style=cfg.s3_force_path_style,
    )


_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class TargetSpec:
    """A parsed backup URL (what `backup.url` and `backup.s3.*` say)."""

    url: str
    scheme: str
    path: str = ""
    bucket: str = ""
    prefix: str = ""
    endpoint: str = ""
    region: str = ""
    force_path_style: bool = False

    @property
    def display(self) -> str:
        """The URL without query parameters (they may name hosts, never secrets)."""
        return self.url.split("?", 1)[0]


def parse_target(
    url: str, *, endpoint: str = "", region: str = "", force_path_style: bool = False
) -> TargetSpec:
    """Parse a backup URL; fuse.yml's backup.s3.* give the defaults for S3 query keys."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise BackupError(f"backup URL {url}: use file:///absolute/path")
        return TargetSpec(url=url, scheme="file", path=urllib.parse.unquote(parts.path))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise BackupError(f"backup URL {url}: no bucket (use s3://bucket/prefix)")
        query = urllib.parse.parse_qs(parts.query)
        unknown = set(query) - {"endpoint", "region", "force-path-style"}
        if unknown:
            raise BackupError(
                f"backup URL {url}: unknown parameter {sorted(unknown)[0]!r} "
                "(endpoint, region, force-path-style)"
            )
        pick = {k: v[-1] for k, v in query.items()}
        return TargetSpec(
            url=url,
            scheme="s3",
            bucket=parts.netloc,
            prefix=parts.path.strip("/"),
            endpoint=pick.get("endpoint", endpoint),
            region=pick.get("region", region),
            force_path_style=pick["force-path-style"].lower() in _TRUE
            if "force-path-style" in pick
            else force_path_style,
        )
    raise BackupError(
        f"backup URL {url}: unknown scheme {parts.scheme or '(none)'!r}; "
        "use file:///path or s3://bucket/prefix"
    )


def _parse_log(log_s: _Section) -> LogConfig:
    return LogConfig(
        format=log_s.choice("format", LOG_FORMATS, "text"), debug=log_s.boolean("debug", False)
    )


def _parse_exec(top: _Section) -> tuple[ExecCommand, ...]:
    value = top.get("exec")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise top.error("exec", f"expected a command string or a list, got {_describe(value)}")
    commands: list[ExecCommand] = []
    for index, item in enumerate(value):
        where = f"exec[{index}]"
        if isinstance(item, str):
            if not item.strip():
                raise ConfigError(f"{top.source}: {where}: empty command")
            commands.append(ExecCommand(cmd=item))
            continue
        if not isinstance(item, Mapping):
            raise ConfigError(
                f"{top.source}: {where}: expected a command string or a mapping with cmd, "
                f"got {_describe(item)}"
            )
        item_s = _Section(item, where + ".", top.source, _SECTION_KEYS["exec[]"])
        commands.append(
            ExecCommand(
                cmd=item_s.string("cmd"), if_candidate=item_s.boolean("if-candidate", False)
            )
        )
    return tuple(commands)
