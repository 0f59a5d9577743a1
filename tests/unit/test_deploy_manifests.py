"""deploy/: the Dockerfile and the Kubernetes manifests, checked offline.

- Every manifest validates with kubernetes-validate (strict: unknown fields are errors)
  against the pinned Kubernetes version, both the files of the base and what kustomize
  renders for the base and the example overlay. The Prometheus Operator's PodMonitor has no
  schema there: it is checked field by field against what the Prometheus Operator's
  monitoring.coreos.com/v1 PodMonitor takes for the fields used, and against the pod.
- kustomize (the real one, see tests/deploy_manifests.py) renders the base and the overlay.
- The pieces agree with each other: the Dockerfile's user, command and install with the
  pod, the ConfigMap and scripts/run-example; smtproxy.toml's ports, files and socket with
  the containers, volumes, Service, probes, NetworkPolicy, init container and drain times.

No Docker engine and no cluster: what a build or a cluster would add is not tested here.
The ConfigMap's smtproxy.toml is checked and started by tests/integration/test_deploy.py.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy_manifests import (
    BASE,
    COLLECTD_CONTAINER,
    DEPLOY,
    DOCKER_CONFIG,
    DOCKERFILE,
    KUBERNETES,
    KUBERNETES_VERSION,
    KUSTOMIZATIONS,
    OVERLAY,
    REDIRECT_INIT_CONTAINER,
    REPO,
    SMTPROXY_CONTAINER,
    all_containers,
    config_file_paths,
    config_sections,
    container,
    container_port,
    dockerfile_stages,
    dockerignore_includes,
    documented_keys,
    exec_form,
    find,
    kinds,
    kustomize_command,
    kustomize_version,
    load_yaml_documents,
    mount_of,
    option,
    pod_spec,
    port_of,
    render,
    smtproxy_config,
    smtproxy_config_text,
    volume,
)

EXPECTED_KINDS = {"ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget", "PodMonitor",
                  "NetworkPolicy"}
# Kinds kubernetes-validate has no schema for, and how they are checked instead.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}


def _smtproxy_stage():
    stages = dockerfile_stages()
    return stages[-1]  # the default target: the last stage


def _stage(name: str):
    return next(s for s in dockerfile_stages() if s.name == name)


def _user(stage) -> tuple[int, int]:
    user, _, group = stage.last("USER").partition(":")
    assert user.isdigit() and group.isdigit(), (
        f"USER {user}:{group} in stage {stage.name}: numeric uid:gid, so that Kubernetes can "
        "check runAsNonRoot without runAsUser")
    return int(user), int(group)


def _argv(c: dict[str, Any]) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(KUSTOMIZATIONS[request.param])


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_is_slim_python_311() -> None:
    for stage in dockerfile_stages():
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base), stage.base


def test_dockerfile_installs_like_run_example() -> None:
    """scripts/run-example (the README's run command) does `pip install ... -e .` into
    .venv; the image does the same install without -e (the comment says why) from a
    directory holding the same project files."""
    run_example = (REPO / "scripts" / "run-example").read_text()
    readme = (REPO / "README.md").read_text()
    assert "./scripts/run-example" in readme and "install smtproxy into .venv" in readme
    script_installs = [shlex.split(line.split("python", 1)[1])
                       for line in run_example.splitlines() if "-m pip install" in line]
    assert len(script_installs) == 1, script_installs
    script_args = script_installs[0]
    assert script_args[:3] == ["-m", "pip", "install"] and script_args[-2:] == ["-e", "."], script_args

    stage = _smtproxy_stage()
    pip_runs = [cmd for cmd in stage.all("RUN") if "pip install" in cmd]
    assert len(pip_runs) == 1, pip_runs
    first = pip_runs[0].split("&&")[0].split()
    assert first == ["pip", "install", "."], f"the image's install line is {first}, not `pip install .`"
    # `pip install .` runs where the project was copied: pyproject.toml, README.md (its
    # readme) and the package; nothing else is needed, as for run-example's `-e .`.
    instructions = stage.instructions
    run_index = instructions.index(("RUN", pip_runs[0]))
    workdir = [args for kw, args in instructions[:run_index] if kw == "WORKDIR"][-1]
    copied = {}
    for kw, args in instructions[:run_index]:
        if kw == "COPY":
            *sources, dest = args.split()
            for source in sources:
                copied[source] = dest
    assert copied.get("pyproject.toml") == "./" and copied.get("README.md") == "./", copied
    assert copied.get("smtproxy", "").rstrip("/") == "./smtproxy", copied
    assert workdir == "/src"
    text = DOCKERFILE.read_text()
    assert "`pip install -e .`" in text and "plain `pip install .`, not -e" in text


def test_dockerfile_copies_only_what_exists_and_the_context_keeps_it() -> None:
    ignore = DEPLOY / "Dockerfile.dockerignore"
    for stage in dockerfile_stages():
        for args in stage.all("COPY"):
            *sources, _dest = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such file in the build context"
                assert dockerignore_includes(ignore, source.rstrip("/")), f"{ignore.name} drops {source}"
    assert not dockerignore_includes(ignore, ".venv"), "the build context should not carry .venv"


def test_dockerfile_runs_as_non_root_and_the_pod_agrees() -> None:
    spec = pod_spec(render(BASE))
    for stage_name, container_name in ((_smtproxy_stage().name, SMTPROXY_CONTAINER),
                                       ("tlsrpt-collectd", COLLECTD_CONTAINER)):
        uid, gid = _user(_stage(stage_name))
        assert uid != 0 and gid != 0
        context = container(spec, container_name)["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid), container_name
    # The user exists in the image (useradd with that uid/gid), so files have a name.
    smtproxy_uid, smtproxy_gid = _user(_smtproxy_stage())
    assert any(f"--uid {smtproxy_uid} --gid {smtproxy_gid}" in run for run in _smtproxy_stage().all("RUN"))


def test_dockerfile_command_is_the_pods_and_its_config_is_in_the_configmap() -> None:
    stage = _smtproxy_stage()
    cmd = exec_form(stage.last("CMD"))
    assert cmd == ["smtproxy", "run", "--config", "/etc/smtproxy/smtproxy.toml"]
    assert not stage.all("ENTRYPOINT")
    for name, directory in KUSTOMIZATIONS.items():
        docs = render(directory)
        assert _argv(container(pod_spec(docs), SMTPROXY_CONTAINER)) == cmd, name
        text, path = smtproxy_config_text(docs)  # follows --config through the mount to the key
        assert str(path) == cmd[-1] and "[inbound]" in text


def test_dockerfile_read_only_root_writes_only_to_its_volume() -> None:
    """The image's own config generates its certificate on first start: every file it
    would write (the self-signed pair) is under a VOLUME owned by the image's user; the
    config file itself is the one the Dockerfile copies to the CMD's path."""
    import tomllib

    stage = _smtproxy_stage()
    volumes = [PurePosixPath(v) for args in stage.all("VOLUME") for v in exec_form(args)]
    copies = dict(reversed(args.split()) for args in stage.all("COPY") if args.startswith("deploy/"))
    assert copies[exec_form(stage.last("CMD"))[-1]] == str(DOCKER_CONFIG.relative_to(REPO))
    config = tomllib.loads(DOCKER_CONFIG.read_text())
    generated = [c for c in config["inbound"]["certificates"] if c.get("self_signed_if_missing")]
    assert generated, "the image's config should make its own certificate"
    uid, gid = _user(stage)
    for entry in generated:
        for key in ("cert_file", "key_file"):
            path = PurePosixPath(entry[key])
            holder = next((v for v in volumes if v in path.parents), None)
            assert holder is not None, f"{key} = {path} is not on a VOLUME ({volumes})"
            assert any(f"install -d -o {uid} -g {gid}" in run and str(holder) in run
                       for run in stage.all("RUN")), f"{holder} is not created for uid {uid}"
    assert config["tlsrpt"]["socket"] == "", "no collector beside a lone container: TLSRPT off"


# --------------------------------------------------------------------------- kustomize


def test_kustomize_renders_base_and_overlay() -> None:
    """The real kustomize (kubectl's) builds both; the overlay's changes show up."""
    assert kustomize_command(), kustomize_version()
    base = render(BASE)
    overlay = render(OVERLAY)
    assert kinds(base) == EXPECTED_KINDS, kinds(base)
    # The overlay drops the placeholder Secret (the real one is made outside kustomize).
    assert kinds(overlay) == EXPECTED_KINDS - {"Secret"}, kinds(overlay)
    assert {d["metadata"].get("namespace") for d in overlay} == {"mail"}
    assert all("namespace" not in d["metadata"] for d in base)
    assert find(overlay, "Deployment")["spec"]["replicas"] == 3
    images = {c["name"]: c["image"] for c in all_containers(pod_spec(overlay))}
    assert images == {
        REDIRECT_INIT_CONTAINER: "registry.example.com/mail/smtproxy:0.1.0",
        "mta": "registry.example.com/mail/qmail:1.03-netqmail",
        SMTPROXY_CONTAINER: "registry.example.com/mail/smtproxy:0.1.0",
        COLLECTD_CONTAINER: "registry.example.com/mail/tlsrpt-collectd:0.6.0",
    }
    assert find(overlay, "PodMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for docs, directory in ((base, BASE), (overlay, OVERLAY)):
        spec = pod_spec(docs)
        config_map = find(docs, "ConfigMap")
        # the generated name carries a content hash and the pod mounts exactly that one
        assert re.fullmatch(r"smtproxy-[a-z0-9]{10}", config_map["metadata"]["name"])
        assert volume(spec, "config")["configMap"]["name"] == config_map["metadata"]["name"]
        assert set(config_map["data"]) == {"smtproxy.toml", "tls_policy", "routes"}
        assert config_map["data"]["tls_policy"] == (directory / "tls_policy").read_text()
        assert config_map["data"]["routes"] == (directory / "routes").read_text()
        assert config_map["data"]["smtproxy.toml"] == (BASE / "smtproxy.toml").read_text()
    assert find(base, "ConfigMap")["metadata"]["name"] != find(overlay, "ConfigMap")["metadata"]["name"]


# --------------------------------------------------------------------------- validation


def _plain_manifests() -> list[Path]:
    """The base's resource files (kustomization.yaml and the overlay's patches are not
    Kubernetes objects; they are checked by rendering)."""
    import yaml

    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    return [BASE / name for name in listed]


def _check_pod_monitor(doc: dict[str, Any]) -> None:
    """The fields of monitoring.coreos.com/v1 PodMonitor used here, with their types as
    the Prometheus Operator's CRD defines them; nothing else is allowed."""
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, set(doc)
    assert set(doc["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
    selector = doc["spec"]["selector"]
    assert set(selector) <= {"matchLabels", "matchExpressions"}
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in selector["matchLabels"].items())
    endpoints = doc["spec"]["podMetricsEndpoints"]
    assert isinstance(endpoints, list) and endpoints
    for endpoint in endpoints:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
        assert isinstance(endpoint["port"], str)  # a container port *name*
        assert endpoint.get("scheme", "http") in ("http", "https")
        for duration in ("interval", "scrapeTimeout"):
            if duration in endpoint:  # the CRD's pattern for Duration
                assert re.fullmatch(r"(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                    r"(([0-9]+)s)?(([0-9]+)ms)?)", endpoint[duration])


def _validate(doc: dict[str, Any], where: str) -> None:
    if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
        _check_pod_monitor(doc)
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        raise AssertionError(f"{where}: {doc['kind']}/{doc['metadata']['name']} invalid against "
                             f"Kubernetes {error.version}: {path}: {error.message}") from None


def test_every_manifest_validates_offline() -> None:
    seen = set()
    for path in _plain_manifests():
        for doc in load_yaml_documents(path):
            _validate(doc, str(path.relative_to(REPO)))
            seen.add(doc["kind"])
    for name, directory in KUSTOMIZATIONS.items():
        for doc in render(directory):
            _validate(doc, f"kustomize build {name}")
    assert seen == EXPECTED_KINDS - {"ConfigMap"}  # the ConfigMap is generated


def test_validation_is_strict_and_pinned() -> None:
    """A control: the validator rejects a misspelt field and a wrong type, so the test
    above can fail; the pinned version's schemas are there (no silent fallback)."""
    deployment = find(render(BASE), "Deployment")
    assert kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True) == "1.32"
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    monitor = copy.deepcopy(find(render(BASE), "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["targetPort"] = 9464  # deprecated, not used here
    with pytest.raises(AssertionError):
        _check_pod_monitor(monitor)


# --------------------------------------------------------------------------- the pod


def test_security_contexts_are_strict(rendered: list[dict[str, Any]]) -> None:
    spec = pod_spec(rendered)
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert all(not spec.get(flag) for flag in ("hostNetwork", "hostPID", "hostIPC"))
    for name in (SMTPROXY_CONTAINER, COLLECTD_CONTAINER):
        context = container(spec, name)["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
    for c in all_containers(spec):
        context = c["securityContext"]
        assert context.get("privileged", False) is False, c["name"]
        assert context["allowPrivilegeEscalation"] is False, c["name"]
        assert context["capabilities"]["drop"] == ["ALL"], c["name"]
        added = set(context["capabilities"].get("add", []))
        if c["name"] == REDIRECT_INIT_CONTAINER:
            assert added == {"NET_ADMIN"}  # NET_ADMIN only there
        else:
            assert "NET_ADMIN" not in added and "NET_RAW" not in added and "SYS_ADMIN" not in added
        # every container has requests and limits
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]


def test_probes_use_the_metrics_listener(rendered: list[dict[str, Any]]) -> None:
    spec = pod_spec(rendered)
    c = container(spec, SMTPROXY_CONTAINER)
    config = smtproxy_config(rendered)
    assert container_port(c, "metrics") == port_of(config["metrics"]["listen"])
    assert config["metrics"]["listen"].startswith("0.0.0.0:"), "kubelet probes come from outside the pod"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_ports_service_and_selectors_agree(rendered: list[dict[str, Any]]) -> None:
    deployment = find(rendered, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    spec = pod_spec(rendered)
    c = container(spec, SMTPROXY_CONTAINER)
    config = smtproxy_config(rendered)
    assert [container_port(c, "smtp")] == [port_of(a) for a in config["inbound"]["listen"]]
    assert [container_port(c, "submissions")] == [port_of(a) for a in config["inbound"]["implicit_tls_listen"]]
    service = find(rendered, "Service")
    assert {(p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {(25, "smtp"), (465, "submissions")}
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # the client's own address reaches smtproxy
    # Binding 25/465 without CAP_NET_BIND_SERVICE needs the pod's unprivileged-port sysctl.
    sysctls = {s["name"]: s["value"] for s in spec["securityContext"]["sysctls"]}
    assert int(sysctls["net.ipv4.ip_unprivileged_port_start"]) <= min(25, 465)
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": service["spec"]["selector"],
        "PodDisruptionBudget": find(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "PodMonitor": find(rendered, "PodMonitor")["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": find(rendered, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and selector.items() <= pod_labels.items(), f"{kind} selector {selector} misses the pod"
    # The backend is the MTA in the same pod, on loopback only.
    assert config["inbound"]["backend"] == "127.0.0.1:2525"


def test_pod_monitor_scrapes_the_metrics_port(rendered: list[dict[str, Any]]) -> None:
    monitor = find(rendered, "PodMonitor")
    _check_pod_monitor(monitor)
    c = container(pod_spec(rendered), SMTPROXY_CONTAINER)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert container_port(c, endpoint["port"]) == port_of(smtproxy_config(rendered)["metrics"]["listen"])


def test_network_policy(rendered: list[dict[str, Any]]) -> None:
    policy = find(rendered, "NetworkPolicy")["spec"]
    c = container(pod_spec(rendered), SMTPROXY_CONTAINER)
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    smtp_rule, metrics_rule = policy["ingress"]
    assert "from" not in smtp_rule  # mail from anywhere
    assert {p["port"] for p in smtp_rule["ports"]} == {"smtp", "submissions"}
    assert [p["port"] for p in metrics_rule["ports"]] == ["metrics"]
    assert metrics_rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    for rule in (smtp_rule, metrics_rule):
        for port in rule["ports"]:
            container_port(c, port["port"])  # the named port exists
    egress = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {(53, "UDP"), (53, "TCP"), (smtproxy_config(rendered)["outbound"]["port"], "TCP"),
                      (443, "TCP")}  # MTA-STS policy fetches
    assert smtproxy_config(rendered)["mta_sts"]["enabled"] is True


def test_config_files_and_socket_are_on_the_right_volumes(rendered: list[dict[str, Any]]) -> None:
    """Every file smtproxy.toml names is on a volume of the smtproxy container: tables in
    the ConfigMap (as keys), certificates in the kubernetes.io/tls Secret (tls.crt/tls.key),
    the TLSRPT socket on an emptyDir that tlsrpt-collectd mounts at the same path and
    binds (--socketname), writable for smtproxy's group."""
    spec = pod_spec(rendered)
    c = container(spec, SMTPROXY_CONTAINER)
    config = smtproxy_config(rendered)
    config_map = find(rendered, "ConfigMap")
    base_secret = find(render(BASE), "Secret")
    for key, path in config_file_paths(config):
        mount, inside = mount_of(spec, c, path)
        if key == "tlsrpt.socket":
            assert "emptyDir" in mount.volume
            collectd = container(spec, COLLECTD_CONTAINER)
            assert option(_argv(collectd), "--socketname") == path
            collectd_mount, _ = mount_of(spec, collectd, path)
            assert collectd_mount.volume["name"] == mount.volume["name"]
            mode = int(option(_argv(collectd), "--socketmode"), 8)
            assert mode & 0o020, "the socket must be writable for its group"
            assert container(spec, COLLECTD_CONTAINER)["securityContext"]["runAsGroup"] == \
                c["securityContext"]["runAsGroup"], "collectd's group is smtproxy's"
        elif key.startswith("inbound.certificates"):
            secret = mount.volume["secret"]
            assert secret["secretName"] == base_secret["metadata"]["name"]
            assert base_secret["type"] == "kubernetes.io/tls"
            assert str(inside) in base_secret["stringData"], f"{key}: {inside} is no key of the Secret"
            # readable by smtproxy's group (fsGroup), not by others
            assert secret["defaultMode"] & 0o007 == 0
            assert spec["securityContext"]["fsGroup"] == c["securityContext"]["runAsGroup"]
        else:
            assert volume(spec, mount.volume["name"])["configMap"]["name"] == config_map["metadata"]["name"], key
            assert str(inside) in config_map["data"], f"{key}: the ConfigMap has no {inside}"


def test_config_is_complete_against_the_documentation() -> None:
    """smtproxy.toml in the ConfigMap writes out every documented key (and no other:
    smtproxy would refuse an unknown one; tests/integration/test_deploy.py runs the check)."""
    documented, arrays = documented_keys()
    written = config_sections(smtproxy_config(render(BASE)))
    assert set(written) <= set(documented), set(written) - set(documented)
    for section, keys in documented.items():
        if section not in written:
            assert section in arrays, f"section [{section}] is missing"
            assert f"# no [[{section}]]" in (BASE / "smtproxy.toml").read_text(), section
            continue
        assert written[section] == keys, (
            f"[{section}]: missing {sorted(keys - written[section])}, "
            f"undocumented {sorted(written[section] - keys)}")


def test_transparent_mode_init_container_matches_smtproxy(rendered: list[dict[str, Any]]) -> None:
    """mode = "transparent" needs the REDIRECT; the rule's port is the outbound listener's
    and the uid it spares is smtproxy's own (its connections to remote port 25 must not
    loop back). The script itself runs in tests/integration/test_deploy.py."""
    spec = pod_spec(rendered)
    config = smtproxy_config(rendered)
    assert config["outbound"]["mode"] == "transparent"
    init = container(spec, REDIRECT_INIT_CONTAINER, init=True)
    env = {e["name"]: e["value"] for e in init["env"]}
    (listen,) = config["outbound"]["listen"]
    assert listen.startswith("127.0.0.1:"), "the outbound listener stays inside the pod"
    assert int(env["OUTBOUND_PORT"]) == port_of(listen)
    assert int(env["SMTPROXY_UID"]) == container(spec, SMTPROXY_CONTAINER)["securityContext"]["runAsUser"]
    assert int(env["SMTPROXY_UID"]) == _user(_smtproxy_stage())[0]
    script = init["args"][0]
    assert '! --uid-owner "$SMTPROXY_UID"' in script and '--to-ports "$OUTBOUND_PORT"' in script
    # The init container runs the smtproxy image, which carries iptables.
    assert init["image"] == container(spec, SMTPROXY_CONTAINER)["image"]
    assert any("iptables" in run for run in _smtproxy_stage().all("RUN"))


def test_shutdown_order_leaves_time_to_drain(rendered: list[dict[str, Any]]) -> None:
    """SIGTERM reaches smtproxy after its preStop sleep; it drains for drain_timeout; the
    MTA (the backend of the sessions being drained) and tlsrpt-collectd outlive that, and
    the grace period covers all of it."""
    spec = pod_spec(rendered)
    config = smtproxy_config(rendered)
    drain = max(config["inbound"]["drain_timeout"], config["outbound"]["drain_timeout"])

    def pre_stop(name: str) -> int:
        return container(spec, name)["lifecycle"]["preStop"]["sleep"]["seconds"]

    smtproxy_done = pre_stop(SMTPROXY_CONTAINER) + drain
    for name in ("mta", COLLECTD_CONTAINER):
        assert pre_stop(name) > smtproxy_done, name
    assert spec["terminationGracePeriodSeconds"] > max(pre_stop(n) for n in ("mta", COLLECTD_CONTAINER))
    assert find(rendered, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert find(rendered, "Deployment")["spec"]["replicas"] >= 2
    strategy = find(rendered, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_docs_exist_and_reference_prometheus_files() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for needle in ("control/smtproutes", "qmail-smtpd", "send connector", "receive connector",
                   "deploy/prometheus/smtproxy-alerts.yml", "kubectl kustomize"):
        assert needle in readme, needle
    for reference in re.findall(r"`(deploy/[\w./-]+|grafana/[\w./-]+)`", readme):
        assert (REPO / reference).exists(), f"deploy/README.md names {reference}, which does not exist"
    assert (KUBERNETES / "base" / "kustomization.yaml").exists()


def test_readme_relay_mode_recipe_renders(tmp_path: Path) -> None:
    """deploy/README.md's relay-mode recipe (its patch, verbatim, plus an smtproxy.toml with
    mode = "relay") renders, validates, and leaves no init container and no NET_ADMIN."""
    import os

    import yaml

    readme = (DEPLOY / "README.md").read_text()
    (snippet,) = re.findall(r"```yaml\n(patches:\n.*?)```", readme, flags=re.S)
    relay_config = (BASE / "smtproxy.toml").read_text().replace('mode = "transparent"', 'mode = "relay"')
    assert 'mode = "relay"' in relay_config
    (tmp_path / "smtproxy.toml").write_text(relay_config)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(BASE, tmp_path)],
        "configMapGenerator": [{"name": "smtproxy", "behavior": "merge", "files": ["smtproxy.toml"]}],
        **yaml.safe_load(snippet),
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    docs = render(tmp_path)
    for doc in docs:
        _validate(doc, "relay recipe")
    spec = pod_spec(docs)
    assert "initContainers" not in spec
    assert all("NET_ADMIN" not in c["securityContext"]["capabilities"].get("add", []) for c in all_containers(spec))
    assert smtproxy_config(docs)["outbound"]["mode"] == "relay"
