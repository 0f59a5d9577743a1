"""deploy/ with real programs: the ConfigMap's smtproxy.toml checked and started, the
image's default config started, the init container's iptables script run.

The pod's files are laid out the way the pod sees them, followed from the rendered
manifests (tests/deploy_manifests.py): each volume of the smtproxy container becomes a
directory (ConfigMap keys as files, the kubernetes.io/tls Secret's tls.crt/tls.key from a
trustme CA, emptyDirs empty), and every path in smtproxy.toml is moved to where its volume
landed. Listen addresses become free loopback ports; nothing else in the config changes.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import trustme

from tests.deploy_manifests import (
    DOCKER_CONFIG,
    KUSTOMIZATIONS,
    REDIRECT_INIT_CONTAINER,
    SMTPROXY_CONTAINER,
    container,
    dockerfile_stages,
    exec_form,
    mount_of,
    mounts,
    pod_spec,
    render,
    smtproxy_config_text,
)
from tests.integration.peers import SmtpSink, SmtproxyProcess, free_port, to_toml

HOSTNAME = "mx.example.com"  # smtproxy.toml's [inbound] hostname, the certificate's name


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: the TLSRPT socket path must fit in sun_path (108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="smtproxy-deploy-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class PodFiles:
    config_path: Path  # smtproxy.toml, paths moved, addresses as in the ConfigMap
    config: dict[str, Any]
    volumes: dict[str, Path]  # volume name -> directory


def _map_paths(value: Any, key: str, move: Callable[[str], str]) -> Any:
    if isinstance(value, Mapping):
        return {k: _map_paths(v, f"{key}.{k}" if key else k, move) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_paths(v, key, move) for v in value]
    if isinstance(value, str) and value and (key.endswith("_file") or key == "tlsrpt.socket"):
        return move(value)
    return value


def lay_out_pod_files(docs: list[dict[str, Any]], root: Path, ca: trustme.CA) -> PodFiles:
    """The smtproxy container's volumes as directories under ``root``; smtproxy.toml with
    its paths moved there. A path on no volume fails (the root file system holds none)."""
    spec = pod_spec(docs)
    c = container(spec, SMTPROXY_CONTAINER)
    text, config_path = smtproxy_config_text(docs)
    config = tomllib.loads(text)
    cert = ca.issue_cert(HOSTNAME, "127.0.0.1")
    volumes: dict[str, Path] = {}
    for mount in mounts(spec, c):
        directory = root / mount.volume["name"]
        directory.mkdir(parents=True)
        volumes[mount.volume["name"]] = directory
        if "configMap" in mount.volume:
            (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"
                             and d["metadata"]["name"] == mount.volume["configMap"]["name"]]
            for key, content in config_map["data"].items():
                (directory / key).write_text(content)
        elif "secret" in mount.volume:
            # what `kubectl create secret tls` (or cert-manager) puts there
            cert.private_key_pem.write_to_path(str(directory / "tls.key"))
            (directory / "tls.crt").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))

    def move(path: str) -> str:
        mount, inside = mount_of(spec, c, path)
        return str(volumes[mount.volume["name"]] / inside)

    moved = _map_paths(config, "", move)
    host_config = Path(move(str(config_path)))
    host_config.write_text(to_toml(moved))
    return PodFiles(host_config, moved, volumes)


def run_check(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smtproxy", "check", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def on_loopback(config: dict[str, Any], backend_port: int) -> tuple[dict[str, Any], dict[str, int]]:
    """The config with every listener on a free loopback port and the given backend."""
    ports = {"smtp": free_port(), "submissions": free_port(), "outbound": free_port(), "metrics": free_port()}
    config = json.loads(json.dumps(config))
    config["inbound"]["listen"] = [f"127.0.0.1:{ports['smtp']}"]
    config["inbound"]["implicit_tls_listen"] = [f"127.0.0.1:{ports['submissions']}"]
    config["inbound"]["backend"] = f"127.0.0.1:{backend_port}"
    config["outbound"]["listen"] = [f"127.0.0.1:{ports['outbound']}"]
    config["metrics"]["listen"] = f"127.0.0.1:{ports['metrics']}"
    return config, ports


@pytest.fixture
def started() -> Iterator[list[SmtproxyProcess]]:
    processes: list[SmtproxyProcess] = []
    yield processes
    for process in processes:
        process.stop()


# --------------------------------------------------------------------------- the ConfigMap's config


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZATIONS))
def test_configmap_config_passes_check(kustomization: str, short_tmp: Path, ca: trustme.CA) -> None:
    """`smtproxy check` accepts the rendered ConfigMap's smtproxy.toml as it is (only its
    paths moved to where the volumes are), with the tables of that rendering."""
    pod = lay_out_pod_files(render(KUSTOMIZATIONS[kustomization]), short_tmp, ca)
    result = run_check(pod.config_path)
    assert result.returncode == 0, f"smtproxy check failed:\n{result.stdout}\n{result.stderr}"
    effective = tomllib.loads(result.stdout)
    assert effective["outbound"]["mode"] == "transparent"
    assert effective["inbound"]["listen"] == ["0.0.0.0:25"]  # the addresses were not touched
    assert effective["tlsrpt"]["socket"] == pod.config["tlsrpt"]["socket"]
    # The tables are the rendering's: the overlay's policy names example.com, the base's is empty.
    policy = subprocess.run([sys.executable, "-m", "smtproxy", "policy", "--config", str(pod.config_path),
                             "example.com"], capture_output=True, text=True, timeout=60)
    assert policy.returncode == 0, policy.stderr
    if kustomization == "overlay":
        assert "level: secure" in policy.stdout and "source: policy_file" in policy.stdout, policy.stdout
    else:
        assert "source: default_level" in policy.stdout, policy.stdout


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZATIONS))
def test_configmap_config_starts_and_serves(
    kustomization: str, short_tmp: Path, ca: trustme.CA, smtp_sink: SmtpSink,
    started: list[SmtproxyProcess],
) -> None:
    """smtproxy runs with the ConfigMap's config on loopback ports: `smtproxy ready`, the
    Deployment's probe paths answer 200 (the backend, an smtp-sink, is up), STARTTLS and
    implicit TLS present the Secret's certificate."""
    docs = render(KUSTOMIZATIONS[kustomization])
    pod = lay_out_pod_files(docs, short_tmp, ca)
    config, ports = on_loopback(pod.config, smtp_sink.port)
    pod.config_path.write_text(to_toml(config))
    process = SmtproxyProcess(pod.config_path)
    started.append(process)
    process.start()
    process.wait_ready(30)

    c = container(pod_spec(docs), SMTPROXY_CONTAINER)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = c[probe]["httpGet"]["path"]
        status, body = http_get(ports["metrics"], path)
        assert status == 200, f"{probe} {path}: {status} {body}"
    status, body = http_get(ports["metrics"], "/metrics")
    assert status == 200 and "smtproxy_connections_active" in body

    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as client:
        client.ehlo("client.example")
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=context)  # verifies the chain and the name 127.0.0.1
        assert code == 220
        peer = client.sock.getpeercert()
        assert ("DNS", HOSTNAME) in peer["subjectAltName"]
        client.ehlo("client.example")
        assert client.noop()[0] == 250
    with socket.create_connection(("127.0.0.1", ports["submissions"]), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=HOSTNAME) as tls:
        assert tls.recv(512).startswith(b"220")


# --------------------------------------------------------------------------- the image's default config


def test_image_default_config_starts_writing_only_its_volume(
    short_tmp: Path, smtp_sink: SmtpSink, started: list[SmtproxyProcess],
) -> None:
    """deploy/docker/smtproxy.toml, with the image's volume moved to a directory: smtproxy
    makes its self-signed certificate there on first start and writes nowhere else; a
    second start reuses it."""
    stage = dockerfile_stages()[-1]
    (volume,) = [PurePosixPath(v) for args in stage.all("VOLUME") for v in exec_form(args)]
    volume_dir = short_tmp / "volume"
    volume_dir.mkdir()
    etc = short_tmp / "etc"
    etc.mkdir()

    def move(path: str) -> str:
        inside = PurePosixPath(path).relative_to(volume)  # ValueError: not on the volume
        return str(volume_dir / inside)

    config = _map_paths(tomllib.loads(DOCKER_CONFIG.read_text()), "", move)
    config, ports = on_loopback(config, smtp_sink.port)
    config_path = etc / "smtproxy.toml"
    config_path.write_text(to_toml(config))
    workdir = stage.last("WORKDIR")
    assert PurePosixPath(workdir) == volume  # the process's cwd is the volume too

    for run in (1, 2):
        process = SmtproxyProcess(config_path, cwd=volume_dir)
        started.append(process)
        process.start()
        process.wait_ready(30)
        assert http_get(ports["metrics"], "/readyz")[0] == 200
        process.stop()
        assert sorted(p.name for p in volume_dir.iterdir()) == ["ecdsa.key", "ecdsa.pem"], run
        assert sorted(p.name for p in etc.iterdir()) == ["smtproxy.toml"], run
        if run == 1:
            first = (volume_dir / "ecdsa.pem").read_bytes()
    assert (volume_dir / "ecdsa.pem").read_bytes() == first


# --------------------------------------------------------------------------- the init container

_NETNS_PROBE = r"""
import json, os, select, socket, subprocess, sys

script, spared_uid, outbound_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
OTHER_UID = 65534  # "the MTA": anyone but smtproxy
out = {}
subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)

# The init container: root with nothing but CAP_NET_ADMIN, no new privileges.
env = dict(os.environ, SMTPROXY_UID=str(spared_uid), OUTBOUND_PORT=str(outbound_port))
limited = ["setpriv", "--bounding-set=-all,+net_admin", "--inh-caps=-all,+net_admin", "--no-new-privs"]
caps = subprocess.run([*limited, "grep", "^CapEff:", "/proc/self/status"], capture_output=True, text=True, timeout=10)
out["cap_eff"] = caps.stdout.split()[1]
init = subprocess.run([*limited, "/bin/sh", "-c", script], capture_output=True, text=True, env=env, timeout=30)
out["init"] = [init.returncode, init.stdout, init.stderr]
if init.returncode != 0:
    print(json.dumps(out)); sys.exit(0)

def listener(family, address):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(8)
    return sock

proxy = listener(socket.AF_INET, ("127.0.0.1", outbound_port))
remote = listener(socket.AF_INET, ("127.0.0.5", 25))
names = {proxy: "smtproxy", remote: "remote"}
try:
    remote6 = listener(socket.AF_INET6, ("::1", 25))
    names[remote6] = "remote6"
except OSError:
    remote6 = None

CONNECT = "import socket,sys; socket.create_connection((sys.argv[1], 25), timeout=5).close()"

def connect_as(uid, host):
    result = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                             sys.executable, "-c", CONNECT, host], capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        return "refused: " + (result.stderr.strip().splitlines() or ["?"])[-1]
    ready, _, _ = select.select(list(names), [], [], 5)
    got = []
    for sock in ready:
        sock.accept()[0].close()
        got.append(names[sock])
    return ",".join(sorted(got)) or "nowhere"

out["mta_v4"] = connect_as(OTHER_UID, "127.0.0.5")
out["smtproxy_v4"] = connect_as(spared_uid, "127.0.0.5")
if remote6 is not None:
    out["mta_v6"] = connect_as(OTHER_UID, "::1")
    out["smtproxy_v6"] = connect_as(spared_uid, "::1")
print(json.dumps(out))
"""


def test_init_container_redirects_all_but_smtproxy(tmp_path: Path) -> None:
    """The init container's script from the manifest, run as root with only CAP_NET_ADMIN
    in a network namespace of its own: a port-25 connection of another user (the MTA)
    lands on smtproxy's outbound listener, one of smtproxy's uid reaches the remote; over
    IPv6 the other user is refused and smtproxy's uid gets through."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace (unshare --net)")
    for tool in ("unshare", "setpriv", "iptables", "ip6tables", "ip"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            pytest.skip(f"needs {tool} (Debian: util-linux, iptables, iproute2)")
    spec = pod_spec(render(KUSTOMIZATIONS["base"]))
    init = container(spec, REDIRECT_INIT_CONTAINER, init=True)
    assert init["command"] == ["/bin/sh", "-c"]
    env = {e["name"]: e["value"] for e in init["env"]}
    probe = tmp_path / "probe.py"
    probe.write_text(_NETNS_PROBE)
    result = subprocess.run(
        ["unshare", "--net", "--", sys.executable, str(probe), init["args"][0], env["SMTPROXY_UID"],
         env["OUTBOUND_PORT"]],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"))
    if result.returncode != 0 and "unshare" in result.stderr:
        pytest.skip(f"cannot create a network namespace: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert int(out["cap_eff"], 16) == 1 << 12, f"CapEff {out['cap_eff']}: not CAP_NET_ADMIN alone"
    code, stdout, stderr = out["init"]
    if code != 0 and ("Table does not exist" in stderr or "can't initialize" in stderr):
        pytest.skip(f"no nat table in this kernel: {stderr.strip()}")
    assert code == 0, f"init script failed with only NET_ADMIN:\n{stdout}\n{stderr}"
    assert f"! --uid-owner {env['SMTPROXY_UID']}" in stdout and f"--to-ports {env['OUTBOUND_PORT']}" in stdout
    assert out["mta_v4"] == "smtproxy", out
    assert out["smtproxy_v4"] == "remote", out
    if "mta_v6" in out:
        assert out["mta_v6"].startswith("refused"), out
        assert out["smtproxy_v6"] == "remote6", out
