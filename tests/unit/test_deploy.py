"""deploy/: the Kubernetes manifests, systemd units and Containerfile agree with the code.

Every manifest must pass the Kubernetes schema (strict: no unknown fields); every `FOGLINE_*`
variable must be a configuration key of the process that reads it, and the resolved settings
must be a valid configuration; every command must be a console script of `pyproject.toml`.
"""

from __future__ import annotations

import configparser
import contextlib
import fnmatch
import importlib
import io
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fogline.config import ServiceConfig, from_env, parse
from fogline.service import Service

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
CONTAINERFILE = DEPLOY / "Containerfile"
# BuildKit reads `<Dockerfile>.dockerignore` next to the file given with -f.
IGNOREFILE = DEPLOY / "Containerfile.dockerignore"
KUBE_README = KUBE / "README.md"

# Kubernetes minor version whose schemas the manifests must satisfy (KubeEdge 1.19/1.20 era).
K8S_VERSION = "1.30"
EDGE_LABEL = "node-role.kubernetes.io/edge"
EDGE_RESOURCES = {"cpu": "500m", "memory": "512Mi"}
EDGE_UNIT_LIMITS = {"MemoryMax": "512M", "CPUQuota": "50%"}
# Keys whose values are files a process must read: they have to come from a mounted Secret.
FILE_KEYS = ("tls_ca", "tls_cert", "tls_key", "password_file")
WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet")
# Paths that must never reach the image build: the virtualenv, git, and data dirs (keys!).
NEVER_IN_CONTEXT = (".git/config", ".venv/bin/python", ".fogline/k8s/keys/ca.key")


# --------------------------------------------------------------------------- the code


def _console_scripts() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts: dict[str, str] = data["project"]["scripts"]
    return scripts


@dataclass(frozen=True)
class Process:
    """A process command: its service class (for the role) and its config class."""

    command: str
    service: type[Service]
    config: type[ServiceConfig]


def _process(command: str) -> Process:
    """The service and config classes a console script's module runs (read from its imports)."""
    scripts = _console_scripts()
    assert command in scripts, f"{command!r} is not a console script in pyproject.toml"
    module = importlib.import_module(scripts[command].partition(":")[0])
    found = vars(module).values()
    services = [
        v for v in found if isinstance(v, type) and issubclass(v, Service) and v is not Service
    ]
    configs = [
        v
        for v in found
        if isinstance(v, type) and issubclass(v, ServiceConfig) and v is not ServiceConfig
    ]
    assert len(services) == 1 and len(configs) == 1, (
        f"{command} is not a process command (its module imports services {services}, "
        f"configs {configs})"
    )
    return Process(command, services[0], configs[0])


def _process_commands() -> list[str]:
    return [name for name in _console_scripts() if name != "fogline"]


def _bad_env_names(config: type[ServiceConfig], names: list[str]) -> list[str]:
    """`FOGLINE_*` names that are not keys of `config` (named as `fogline.config.from_env` does)."""
    return [n for n in names if n.startswith("FOGLINE_") and not from_env(config, {n: "x"})]


def _resolve(process: Process, argv: list[str], env: dict[str, str]) -> ServiceConfig:
    """The configuration the process would run with; a configuration error fails the test."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parse(
                process.config,
                argv,
                prog=process.command,
                description=process.command,
                section=process.command,
                env=env,
            )
    except SystemExit:
        pytest.fail(f"{process.command} {argv} refuses its configuration: {err.getvalue()}")


def _check_login(where: str, process: Process, cfg: ServiceConfig) -> None:
    """The broker's ACL derives a client's topics from its login `<role>-<id>`."""
    expected = f"{process.service.role}-{cfg.id}"
    assert cfg.username == expected, (
        f"{where}: {process.command} {cfg.id!r} logs in as {cfg.username!r}; the ACL grants "
        f"id {cfg.id!r} only to {expected!r}"
    )


# --------------------------------------------------------------------------- Kubernetes


def _manifest_files() -> list[Path]:
    files = sorted(KUBE.glob("*.yaml")) + sorted(KUBE.glob("*.yml"))
    assert files, f"no manifests in {KUBE}"
    return files


def _documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, resource) for every resource of every manifest, the Kustomization included."""
    out = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def _resources(kind: str | None = None) -> list[dict[str, Any]]:
    return [
        doc
        for _, doc in _documents()
        if doc["kind"] != "Kustomization" and (kind is None or doc["kind"] == kind)
    ]


def _by_name(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _resources(kind)}


def _workloads() -> list[dict[str, Any]]:
    return [doc for doc in _resources() if doc["kind"] in WORKLOAD_KINDS]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def _name(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


@dataclass(frozen=True)
class Container:
    """A fogline container of a workload, with the process it runs."""

    workload: dict[str, Any]
    spec: dict[str, Any]
    process: Process

    @property
    def where(self) -> str:
        return f"{_name(self.workload)} container {self.spec['name']}"


def _fogline_containers() -> list[Container]:
    processes = set(_process_commands())
    out = []
    for workload in _workloads():
        for spec in _pod(workload)["containers"]:
            command = (spec.get("command") or [""])[0]
            if command in processes:
                out.append(Container(workload, spec, _process(command)))
    return out


def _edge_workloads() -> list[dict[str, Any]]:
    return [c.workload for c in _fogline_containers() if c.process.command == "edge-agent"]


def _env(spec: dict[str, Any]) -> dict[str, str]:
    """A container's environment: its ConfigMaps (`envFrom`), then `env`, which wins."""
    configmaps = _by_name("ConfigMap")
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        assert "configMapRef" in source, f"unexpected envFrom source {source}"
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"envFrom names ConfigMap {name!r}, which no manifest defines"
        env.update(configmaps[name].get("data", {}))
    for item in spec.get("env", []):
        assert "value" in item, f"env {item['name']} has no plain value; teach this test"
        env[item["name"]] = item["value"]
    return env


def _config(container: Container) -> ServiceConfig:
    argv = [*container.spec.get("command", [])[1:], *container.spec.get("args", [])]
    return _resolve(container.process, argv, _env(container.spec))


def _mounts(workload: dict[str, Any], spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in _pod(workload).get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in spec.get("volumeMounts", [])}


def _volume_at(workload: dict[str, Any], spec: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume a file or folder lives on (the longest mountPath that contains it)."""
    best = ""
    for mount in _mounts(workload, spec):
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best = mount
    assert best, f"{_name(workload)}: nothing is mounted at {path}"
    return _mounts(workload, spec)[best]


def _secret_commands() -> dict[str, dict[str, str]]:
    """Secret name -> {key: source file} from the `kubectl create secret generic` commands."""
    text = KUBE_README.read_text().replace("\\\n", " ")
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        m = re.search(r"create secret generic (\S+)(.*)", line)
        if m:
            out[m.group(1)] = dict(re.findall(r"--from-file=([^=\s]+)=(\S+)", m.group(2)))
    return out


def _ports(spec: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in spec.get("ports", []) if "name" in p}


def _required_terms(pod: dict[str, Any]) -> list[dict[str, Any]]:
    affinity = pod.get("affinity", {}).get("nodeAffinity", {})
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms: list[dict[str, Any]] = required.get("nodeSelectorTerms", [])
    return terms


def _tolerates_edge(pod: dict[str, Any]) -> bool:
    return any(
        t.get("key") == EDGE_LABEL
        and (t.get("operator") == "Exists" or t.get("value", "") == "")
        and t.get("effect") in (None, "NoSchedule")
        for t in pod.get("tolerations", [])
    ) or any(t.get("operator") == "Exists" and "key" not in t for t in pod.get("tolerations", []))


def _schema_cases() -> list[Any]:
    return [
        pytest.param(file, doc, id=f"{file}:{_name(doc)}")
        for file, doc in _documents()
        if doc["kind"] != "Kustomization"  # no schema; test_the_kustomization_lists_... checks it
    ]


@pytest.mark.parametrize(("file", "doc"), _schema_cases())
def test_every_manifest_passes_the_kubernetes_schema(file: str, doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{file}: {_name(doc)} is not valid Kubernetes {K8S_VERSION}: {exc.message}")


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    """Strict mode must catch a typo that Kubernetes would otherwise silently drop."""
    edge = _edge_workloads()[0]
    broken = json.loads(json.dumps(edge))
    _pod(broken)["nodeSelecter"] = _pod(broken).pop("nodeSelector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    kustomizations = [d for _, d in _documents() if d["kind"] == "Kustomization"]
    assert len(kustomizations) == 1, "deploy/kubernetes needs one kustomization.yaml"
    listed = kustomizations[0].get("resources", [])
    files = {p.name for p in _manifest_files()} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(files), (
        f"kustomization.yaml resources {sorted(listed)} differ from the manifests {sorted(files)}"
    )
    images = {i["name"] for i in kustomizations[0].get("images", [])}
    used = {c.spec["image"].rsplit(":", 1)[0] for c in _fogline_containers()}
    assert used <= images, f"images {sorted(used - images)} are not set in kustomization.yaml"
    namespaces = {d["metadata"].get("namespace") for d in _resources() if d["kind"] != "Namespace"}
    assert namespaces == {kustomizations[0]["namespace"]}, f"namespaces differ: {namespaces}"


def test_the_edge_agent_runs_only_on_edge_nodes_within_its_budget() -> None:
    edges = _edge_workloads()
    assert edges, "no workload runs edge-agent"
    for workload in edges:
        pod = _pod(workload)
        assert pod.get("nodeSelector", {}).get(EDGE_LABEL) == "", (
            f"{_name(workload)}: nodeSelector must require {EDGE_LABEL}: ''"
        )
        assert _tolerates_edge(pod), f"{_name(workload)} does not tolerate the {EDGE_LABEL} taint"
        for spec in pod["containers"]:
            resources = spec.get("resources", {})
            for part in ("requests", "limits"):
                got = resources.get(part, {})
                assert got == EDGE_RESOURCES, (
                    f"{_name(workload)} {spec['name']}: {part} {got}, want {EDGE_RESOURCES}"
                )


def test_nothing_else_lands_on_edge_nodes() -> None:
    edges = [_name(w) for w in _edge_workloads()]
    others = [w for w in _workloads() if _name(w) not in edges]
    commands = {c.process.command for c in _fogline_containers() if _name(c.workload) not in edges}
    assert {"fog-aggregator", "cloud-sink"} <= commands, f"cloud-side processes: {commands}"
    for workload in others:
        pod = _pod(workload)
        terms = _required_terms(pod)
        assert terms, f"{_name(workload)} has no required node affinity"
        for term in terms:  # terms are ORed: each one must exclude edge nodes
            assert {"key": EDGE_LABEL, "operator": "DoesNotExist"} in [
                {"key": e["key"], "operator": e["operator"]}
                for e in term.get("matchExpressions", [])
            ], f"{_name(workload)}: a node selector term lets it onto edge nodes: {term}"
        assert EDGE_LABEL not in pod.get("nodeSelector", {}), f"{_name(workload)} selects edges"
        assert not _tolerates_edge(pod), f"{_name(workload)} tolerates the edge taint"


def test_every_container_has_requests_and_limits() -> None:
    for workload in _workloads():
        for spec in _pod(workload)["containers"]:
            resources = spec.get("resources", {})
            for part in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(part, {}))
                assert not missing, f"{_name(workload)} {spec['name']}: no {part} for {missing}"


def test_every_environment_variable_is_a_config_key() -> None:
    containers = _fogline_containers()
    assert containers, "no workload runs a fogline process command"
    for c in containers:
        bad = _bad_env_names(c.process.config, list(_env(c.spec)))
        assert not bad, f"{c.where}: {bad} are not configuration keys of {c.process.command}"


def test_every_command_is_a_console_script() -> None:
    scripts = set(_console_scripts())
    fogline_image = {c.spec["image"] for c in _fogline_containers()}
    for workload in _workloads():
        for spec in _pod(workload)["containers"]:
            if spec["image"] in fogline_image:
                command = (spec.get("command") or ["(image default)"])[0]
                assert command in scripts, f"{_name(workload)}: {command!r} is no console script"


def test_each_process_resolves_to_a_safe_configuration() -> None:
    pvcs = _by_name("PersistentVolumeClaim")
    secrets = _secret_commands()
    for c in _fogline_containers():
        cfg = _config(c)
        pod = _pod(c.workload)
        _check_login(c.where, c.process, cfg)
        # A remote broker needs TLS and a login (fogline.config.check_startup refuses otherwise).
        assert cfg.tls_ca and cfg.username and cfg.password_file, f"{c.where}: no TLS or login"
        # State survives a restart: the data dir is on a PVC (or the edge node's own disk).
        data = _volume_at(c.workload, c.spec, str(cfg.data_dir))
        if "persistentVolumeClaim" in data:
            claim = data["persistentVolumeClaim"]["claimName"]
            assert claim in pvcs, f"{c.where}: PVC {claim!r} is not defined"
        else:
            assert c.process.command == "edge-agent" and "hostPath" in data, (
                f"{c.where}: the data dir {cfg.data_dir} is on {data}, which a restart loses"
            )
        # Credentials are files from a Secret, and the Secret is made as the README says.
        for key in FILE_KEYS:
            path = getattr(cfg, key)
            volume = _volume_at(c.workload, c.spec, path)
            assert "secret" in volume, f"{c.where}: {key} {path} is not in a Secret"
            name = volume["secret"]["secretName"]
            assert name in secrets, f"{KUBE_README.name} never creates the Secret {name!r}"
            item = Path(path).name
            assert item in secrets[name], f"Secret {name} has no {item} in {KUBE_README.name}"
        made = secrets[_volume_at(c.workload, c.spec, cfg.tls_cert)["secret"]["secretName"]]
        for key, suffix in (
            ("tls_cert", ".crt"),
            ("tls_key", ".key"),
            ("password_file", ".password"),
        ):
            source = Path(made[Path(getattr(cfg, key)).name]).name
            want = cfg.username + suffix
            assert source == want, f"{c.where}: {key} is made from {source}, want {want}"
        # The kubelet's SIGKILL comes after the process's bounded shutdown.
        grace = pod.get("terminationGracePeriodSeconds", 30)
        assert grace > cfg.shutdown_timeout, (
            f"{c.where}: terminationGracePeriodSeconds {grace} <= shutdown_timeout "
            f"{cfg.shutdown_timeout}"
        )
        # Probes: /metrics on the configured port (there is no other health endpoint).
        assert cfg.metrics_port, f"{c.where}: probes need metrics_port"
        ports = _ports(c.spec)
        for probe in ("livenessProbe", "readinessProbe"):
            get = c.spec.get(probe, {}).get("httpGet")
            assert get, f"{c.where}: no {probe} httpGet"
            port = ports.get(get["port"], get["port"])
            assert (get["path"], port) == ("/metrics", cfg.metrics_port), (
                f"{c.where}: {probe} fetches {get['path']} on {port}, /metrics is on "
                f"{cfg.metrics_port}"
            )


def test_each_process_has_one_replica_and_stops_before_the_next_starts() -> None:
    for c in _fogline_containers():
        spec = c.workload["spec"]
        assert c.workload["kind"] == "Deployment", f"{c.where}: use a Deployment per process id"
        assert spec.get("replicas", 1) == 1, f"{c.where}: one process per custody id"
        assert spec.get("strategy", {}).get("type") == "Recreate", (
            f"{c.where}: RollingUpdate would run two writers of one SQLite file"
        )


def test_the_image_user_owns_the_data_dir() -> None:
    uid = _containerfile_uid()
    for c in _fogline_containers():
        run_as = c.spec.get("securityContext", {}).get("runAsUser") or _pod(c.workload).get(
            "securityContext", {}
        ).get("runAsUser")
        assert run_as == uid, f"{c.where}: runs as {run_as}, the image's user is {uid}"
    edge_steps = KUBE_README.read_text()
    assert f"install -d -o {uid} -g {uid}" in edge_steps, "README: make the edge data dir"


def test_mosquitto_matches_the_secure_template_and_the_clients() -> None:
    conf = None
    for cm in _resources("ConfigMap"):
        conf = cm.get("data", {}).get("mosquitto.conf", conf)
    assert conf, "no ConfigMap holds mosquitto.conf"
    directives = _mosquitto_directives(conf)
    template = _mosquitto_directives((ROOT / "mosquitto" / "secure.conf.tmpl").read_text())
    for key, value in template.items():
        if key in ("user", "log_dest"):  # the image's user; the container logs to stdout
            continue
        assert key in directives, f"mosquitto.conf lacks {key} of secure.conf.tmpl"
        if "${" not in value:
            assert directives[key] == value, f"mosquitto.conf: {key} {directives[key]!r}"
    port = int(directives["listener"].split()[0])
    (broker,) = [w for w in _workloads() if "mosquitto" in _pod(w)["containers"][0]["image"]]
    spec = _pod(broker)["containers"][0]
    assert port in _ports(spec).values(), f"Mosquitto listens on {port}, the container exposes"
    secrets = _secret_commands()
    for key in ("cafile", "certfile", "keyfile", "password_file", "acl_file"):
        volume = _volume_at(broker, spec, directives[key])
        assert "secret" in volume, f"mosquitto {key} {directives[key]} is not in a Secret"
        made = secrets.get(volume["secret"]["secretName"], {})
        assert Path(directives[key]).name in made, f"{KUBE_README.name}: no {directives[key]}"
    service = [s for s in _resources("Service") if s["spec"]["selector"] == _labels(broker)]
    assert len(service) == 1, "one Service must select the Mosquitto pods"
    host = f"{service[0]['metadata']['name']}.{service[0]['metadata']['namespace']}.svc"
    for c in _fogline_containers():
        cfg = _config(c)
        assert cfg.broker_host in (host, host + ".cluster.local"), (
            f"{c.where}: broker_host {cfg.broker_host} is not the Service {host}"
        )
        assert cfg.broker_port in [p["port"] for p in service[0]["spec"]["ports"]]
        assert cfg.broker_host in KUBE_README.read_text(), "the broker certificate must name it"


def _labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["selector"]["matchLabels"]
    return labels


def _mosquitto_directives(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.setdefault(key, value.strip())
    return out


# --------------------------------------------------------------------------- systemd


class _MultiDict(dict[str, Any]):
    """Keeps every value of a repeated key (systemd allows e.g. several EnvironmentFile=)."""

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, list) and key in self and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def _unit_files() -> list[Path]:
    files = sorted(SYSTEMD.glob("*.service"))
    assert files, f"no units in {SYSTEMD}"
    return files


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, dict_type=_MultiDict, empty_lines_in_values=False
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    return parser


def _values(unit: configparser.ConfigParser, section: str, key: str) -> list[str]:
    raw = unit.get(section, key, fallback="")
    return [v.strip() for v in raw.splitlines() if v.strip()]


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip().strip("\"'")
    return out


def _unit_env(path: Path) -> tuple[dict[str, str], list[Path]]:
    """The unit's environment: `Environment=`, then its `EnvironmentFile=`s (examples here)."""
    unit = _unit(path)
    env: dict[str, str] = {}
    for value in _values(unit, "Service", "Environment"):
        env.update(item.split("=", 1) for item in shlex.split(value))  # type: ignore[arg-type]
    files = []
    for value in _values(unit, "Service", "EnvironmentFile"):
        example = SYSTEMD / Path(value.lstrip("-")).name
        assert example.is_file(), f"{path.name}: EnvironmentFile {value} has no example here"
        files.append(example)
        env.update(_env_file(example))
    return env, files


def _exec_start(path: Path) -> tuple[Process, list[str]]:
    (line,) = _values(_unit(path), "Service", "ExecStart")
    argv = shlex.split(line.lstrip("-@:+!"))
    command = Path(argv[0]).name
    assert command in _console_scripts(), f"{path.name}: {command!r} is no console script"
    return _process(command), argv[1:]


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", text.strip())
    assert m, f"cannot read the time span {text!r}"
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


_UNIT_IDS = [p.name for p in _unit_files()]


def test_every_process_command_has_a_unit() -> None:
    units = {p.name for p in _unit_files()}
    missing = [f"fogline-{c}.service" for c in _process_commands()]
    missing = [u for u in missing if u not in units]
    assert not missing, f"deploy/systemd lacks {missing}"


@pytest.mark.parametrize("path", _unit_files(), ids=_UNIT_IDS)
def test_unit_has_the_required_settings(path: Path) -> None:
    unit = _unit(path)
    want = {
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "StateDirectory": "fogline",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
    }
    got = {key: unit.get("Service", key, fallback=None) for key in want}
    assert got == want, f"{path.name}: {got}"
    user = unit.get("Service", "User", fallback="root")
    assert user not in ("root", "0"), f"{path.name} must run as a dedicated user"
    assert _values(unit, "Service", "EnvironmentFile"), f"{path.name}: no EnvironmentFile="
    assert unit.get("Install", "WantedBy", fallback="") == "multi-user.target"


@pytest.mark.parametrize("path", _unit_files(), ids=_UNIT_IDS)
def test_unit_environment_names_are_config_keys(path: Path) -> None:
    process, _ = _exec_start(path)
    env, files = _unit_env(path)
    bad = _bad_env_names(process.config, list(env))
    assert not bad, f"{path.name}: {bad} are not configuration keys of {process.command}"
    shared = [f for f in files if f.name == "fogline.env"]
    for f in shared:  # read by every unit: only keys every process has
        bad = _bad_env_names(ServiceConfig, list(_env_file(f)))
        assert not bad, f"{f.name}: {bad} are not keys of every process"


@pytest.mark.parametrize("path", _unit_files(), ids=_UNIT_IDS)
def test_unit_runs_a_console_script_with_a_valid_configuration(path: Path) -> None:
    unit = _unit(path)
    process, argv = _exec_start(path)
    assert path.name == f"fogline-{process.command}.service", f"{path.name} runs {process}"
    env, _ = _unit_env(path)
    cfg = _resolve(process, argv, env)
    _check_login(path.name, process, cfg)
    state = Path("/var/lib") / unit.get("Service", "StateDirectory")
    assert cfg.data_dir == state, f"{path.name}: data dir {cfg.data_dir}, StateDirectory {state}"
    writable = [Path(p) for v in _values(unit, "Service", "ReadWritePaths") for p in v.split()]
    assert state in writable, f"{path.name}: ReadWritePaths {writable} lacks {state}"
    stop = _seconds(unit.get("Service", "TimeoutStopSec", fallback="90"))
    assert stop > cfg.shutdown_timeout, (
        f"{path.name}: TimeoutStopSec {stop} <= shutdown_timeout {cfg.shutdown_timeout}"
    )
    for key, name in (("tls_cert", ".crt"), ("tls_key", ".key"), ("password_file", ".password")):
        value = Path(getattr(cfg, key)).name
        assert value == cfg.username + name, f"{path.name}: {key} {value} for {cfg.username}"


def test_the_edge_agent_unit_is_capped() -> None:
    unit = _unit(SYSTEMD / "fogline-edge-agent.service")
    got = {key: unit.get("Service", key, fallback=None) for key in EDGE_UNIT_LIMITS}
    assert got == EDGE_UNIT_LIMITS


# --------------------------------------------------------------------------- Containerfile


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _instruction(name: str) -> list[str]:
    return [rest for word, rest in _instructions() if word == name]


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    start = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[start:]


def _containerfile_uid() -> int:
    users = [rest for word, rest in _final_stage() if word == "USER"]
    assert users, "the Containerfile's final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit(), f"USER {user}: give a numeric uid (Kubernetes runAsNonRoot checks it)"
    return int(user)


def _image_env() -> dict[str, str]:
    env = {}
    for rest in (r for w, r in _final_stage() if w == "ENV"):
        env.update(item.split("=", 1) for item in shlex.split(rest))  # type: ignore[arg-type]
    return env


def test_the_containerfile_builds_a_non_root_image_that_stops_cleanly() -> None:
    bases = [rest.split()[0] for rest in _instruction("FROM")]
    assert bases and all(b == "python:3.11-slim" for b in bases), f"bases {bases}"
    assert any(re.search(r"pip install \.(\s|$)", r) for r in _instruction("RUN")), "pip install ."
    assert _containerfile_uid() != 0, "the image must not run as root"
    assert _instruction("STOPSIGNAL") == ["SIGTERM"]
    env = _image_env()
    bad = _bad_env_names(ServiceConfig, list(env))
    assert not bad, f"Containerfile ENV {bad} are not configuration keys"
    volumes = [v for rest in _instruction("VOLUME") for v in json.loads(rest)]
    assert env.get("FOGLINE_DATA_DIR") in volumes, f"data dir not on a VOLUME: {volumes}"
    for word in ("CMD", "ENTRYPOINT"):
        for rest in (r for w, r in _final_stage() if w == word):
            command = json.loads(rest)[0]
            assert command in _console_scripts(), f"{word} {command!r} is no console script"


def _packages() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = data["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(
        d.name
        for d in ROOT.iterdir()
        if (d / "__init__.py").is_file() and any(fnmatch.fnmatch(d.name, p) for p in include)
    )


def _ignore_rules() -> list[tuple[bool, str]]:
    rules = []
    for line in IGNOREFILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, line.lstrip("!").strip("/")))
    return rules


def _ignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    ignored = False
    for negate, pattern in _ignore_rules():
        regex = (
            re.escape(pattern)
            .replace(r"\*\*/", "(?:.*/)?")
            .replace(r"\*\*", ".*")
            .replace(r"\*", "[^/]*")
            .replace(r"\?", "[^/]")
        )
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def _package_files() -> Iterator[str]:
    for package in _packages():
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                yield str(path.relative_to(ROOT))


def test_the_build_context_holds_the_sources_and_nothing_private() -> None:
    packages = _packages()
    assert packages, "pyproject.toml includes no package"
    copied = " ".join(_instruction("COPY"))
    missing = [p for p in ["pyproject.toml", "README.md", *packages] if p not in copied]
    assert not missing, f"the Containerfile does not COPY {missing}"
    needed = ["pyproject.toml", "README.md", *_package_files()]
    assert any(n.endswith(".tflite") for n in needed), "the built-in models are package data"
    ignored = [n for n in needed if _ignored(n)]
    assert not ignored, f"{IGNOREFILE.name} leaves out {ignored[:5]}"
    kept = [p for p in NEVER_IN_CONTEXT if not _ignored(p)]
    assert not kept, f"{IGNOREFILE.name} lets {kept} into the build context"
