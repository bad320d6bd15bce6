"""Offline checks of the deployment files under deploy/.

Nothing here builds an image or talks to a cluster. The Kubernetes manifests
and the Helm chart's rendered copies are validated against the JSON schemas
that the kubernetes-validate package ships, in strict mode (unknown fields are
errors). They are validated for the oldest Kubernetes version the manifests
support and the newest one the package has schemas for. ServiceMonitor is a
Prometheus Operator CRD without a schema there, so it is validated against
SERVICE_MONITOR_SCHEMA below, a subset of the CRD's fields written for these
files, with Kubernetes' own ObjectMeta and LabelSelector definitions. The
Kustomization file is no Kubernetes object and is checked by its resource list
only.

helm cannot be installed from the package registries this project reaches, so
deploy/helm/rendered/ contains hand-maintained copies of `helm template` output.
They are checked against the templates and values.yaml here, and compared with
helm's own output when a helm binary is on PATH.

Two kinds of test start something, both on 127.0.0.1: mongosh runs
deploy/mongo-init.js against SecantusDB, and the image's HEALTHCHECK command
runs against a small HTTP server that stands in for the proxy's /healthz.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from kubernetes_validate import utils as kubernetes_validate
from pymongo import MongoClient
from referencing import Registry, Resource

from proxy.cli import _build_parser
from proxy.crypto.errors import MasterKeyError
from proxy.crypto.master_key import load_local_master_key
from proxy.demo.users import CLINIC_ROLES, DEMO_USERS, SERVICE
from proxy.policy import load_policy
from proxy.serve_config import parse_command_line

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
CHART = DEPLOY / "helm" / "mongoveil"
RENDERED = DEPLOY / "helm" / "rendered"
EXAMPLE_POLICY = ROOT / "policies" / "healthcare.yaml"
MONGOSH = ROOT / "tests" / "clients" / "node_modules" / ".bin" / "mongosh"

# Native sidecars (init containers with restartPolicy Always) need 1.29.
OLDEST_KUBERNETES = "1.29"
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES,
                       kubernetes_validate.major_minor(kubernetes_validate.latest_version()))

# Paths and ports that the image, the manifests and the chart share.
POLICY_PATH = "/etc/mongoveil/policy.yaml"
SERVE_CONFIG_PATH = "/etc/mongoveil/serve.yaml"
MASTER_KEY_PATH = "/etc/mongoveil/keys/master.key"
AUDIT_PATH = "/var/lib/mongoveil/audit.jsonl"
MONGODB_PORT = 27117
METRICS_PORT = 9216

# Where the Kubernetes copies of the example policy differ from it.
KUBERNETES_POLICY_CHANGES = {("keys", "master_key_file"): MASTER_KEY_PATH,
                             ("audit", "file"): AUDIT_PATH}

UPSTREAM_FOR_PARSING = "mongodb://user:secret@db.example.invalid:27017/"


# --- schemas ---------------------------------------------------------------------------

DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
# Prometheus durations as the operator's CRD accepts them: 30s, 1m30s, 500ms, 0.
DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
STRING_LIST = {"type": "array", "items": {"type": "string"}}

SERVICE_MONITOR_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string", "minLength": 1},
        "targetPort": {"type": ["integer", "string"]},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"},
        "honorTimestamps": {"type": "boolean"},
        "params": {"type": "object", "additionalProperties": STRING_LIST},
        "relabelings": {"type": "array", "items": {"type": "object"}},
        "metricRelabelings": {"type": "array", "items": {"type": "object"}},
    },
    # The operator treats port and targetPort as alternatives.
    "not": {"required": ["port", "targetPort"]},
}

# A subset of monitoring.coreos.com/v1 ServiceMonitor: the fields these files
# use and their common neighbours. A field outside it fails the test, so add
# it here (as the CRD defines it) before using it.
SERVICE_MONITOR_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"$ref": f"{DEFINITIONS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"$ref": f"{DEFINITIONS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": STRING_LIST},
                },
                "jobLabel": {"type": "string"},
                "targetLabels": STRING_LIST,
                "podTargetLabels": STRING_LIST,
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {"type": "array", "minItems": 1, "items": SERVICE_MONITOR_ENDPOINT},
            },
        },
    },
}


def _kubernetes_definitions(version: str) -> dict:
    schemas = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    folder = schemas / f"v{version}.0-local-strict"
    return json.loads((folder / "_definitions.json").read_text())


def validate_service_monitor(document: dict, version: str) -> None:
    """Validate a ServiceMonitor; raise jsonschema.ValidationError when it is invalid."""
    registry = Resource.from_contents(_kubernetes_definitions(version)) @ Registry()
    jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA, registry=registry).validate(document)
    for endpoint in document["spec"]["endpoints"]:
        if "interval" in endpoint and "scrapeTimeout" in endpoint:
            assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"]), endpoint


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(number) * units[unit]
               for number, unit in re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)", duration))


def validate_object(document: dict, version: str) -> None:
    """Validate one object strictly, by the schema of its kind."""
    if document["kind"] == "ServiceMonitor":
        validate_service_monitor(document, version)
    else:
        kubernetes_validate.validate(document, version, strict=True)


# --- loading ---------------------------------------------------------------------------

def load_documents(path: Path) -> list[dict]:
    """Return the YAML documents of a file, without the empty ones."""
    with path.open() as stream:
        return [document for document in yaml.safe_load_all(stream) if document]


def kubernetes_manifests() -> list[Path]:
    return sorted(path for path in KUBERNETES.glob("*.yaml") if path.name != "kustomization.yaml")


def all_kubernetes_objects() -> list[dict]:
    return [document for path in kubernetes_manifests() for document in load_documents(path)]


def find_object(documents: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(document: dict) -> dict:
    """Return the Pod spec of a Deployment or Job."""
    return document["spec"]["template"]["spec"]


def containers_of(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def container(spec: dict, name: str) -> dict:
    matches = [c for c in containers_of(spec) if c["name"] == name]
    assert len(matches) == 1, f"expected one container {name}, found {len(matches)}"
    return matches[0]


def env_of(container_spec: dict) -> dict[str, dict]:
    return {variable["name"]: variable for variable in container_spec.get("env", [])}


def nested(mapping: dict, path: tuple[str, ...]) -> object:
    for key in path:
        mapping = mapping[key]
    return mapping


def with_kubernetes_changes(policy: dict) -> dict:
    """Return the example policy as the Kubernetes copies should contain it."""
    changed = json.loads(json.dumps(policy))
    for path, value in KUBERNETES_POLICY_CHANGES.items():
        nested(changed, path[:-1])[path[-1]] = value
    return changed


def serve_config_arguments(config: Path, environ: dict[str, str] | None = None):
    """Parse `mongoveil serve --config FILE` as the image's default command does."""
    environ = {"MONGOVEIL_UPSTREAM": UPSTREAM_FOR_PARSING, **(environ or {})}
    args, _warnings = parse_command_line(_build_parser(), ["serve", "--config", str(config)],
                                         environ)
    return args


# --- Kubernetes manifests --------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", kubernetes_manifests(), ids=lambda path: path.name)
def test_kubernetes_manifest_validates(path, version):
    documents = load_documents(path)

    assert documents, f"{path.name} has no objects"
    for document in documents:
        validate_object(document, version)


def test_kustomization_lists_every_manifest():
    kustomization = load_documents(KUBERNETES / "kustomization.yaml")[0]

    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == "mongoveil"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == {path.name for path in kubernetes_manifests()}


def test_strict_validation_rejects_unknown_field():
    """The validator is strict: a misspelled field fails, so a pass above means something."""
    deployment = load_documents(KUBERNETES / "standalone-deployment.yaml")[0]
    container(pod_spec(deployment), "mongoveil")["livenessProbes"] = {}

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)


@pytest.mark.parametrize("change", [
    ("endpoints", [{"port": "metrics", "intervall": "30s"}]),
    ("endpoints", [{"port": "metrics", "interval": "30 seconds"}]),
    ("endpoints", [{"port": "metrics", "targetPort": 9216}]),
    ("selectors", {}),
], ids=["unknown-endpoint-field", "invalid-duration", "port-and-target-port", "unknown-spec-field"])
def test_service_monitor_schema_rejects(change):
    monitor = load_documents(KUBERNETES / "servicemonitor.yaml")[0]
    key, value = change
    monitor["spec"][key] = value

    with pytest.raises(jsonschema.ValidationError):
        validate_service_monitor(monitor, OLDEST_KUBERNETES)


def test_policy_configmap_is_example_policy():
    configmap = find_object(all_kubernetes_objects(), "ConfigMap", "mongoveil-policy")
    policy = yaml.safe_load(configmap["data"]["policy.yaml"])
    example = yaml.safe_load(EXAMPLE_POLICY.read_text())

    assert policy == with_kubernetes_changes(example)


def test_policy_configmap_loads(tmp_path):
    configmap = find_object(all_kubernetes_objects(), "ConfigMap", "mongoveil-policy")
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(configmap["data"]["policy.yaml"])

    policy = load_policy(policy_file)

    assert policy.master_key_file == Path(MASTER_KEY_PATH)
    assert policy.audit_file == Path(AUDIT_PATH)


def test_serve_configmap_is_serve_yaml():
    configmap = find_object(all_kubernetes_objects(), "ConfigMap", "mongoveil-serve")

    assert yaml.safe_load(configmap["data"]["serve.yaml"]) == \
        yaml.safe_load((DEPLOY / "serve.yaml").read_text())


def test_serve_yaml_parses_as_serve_options():
    args = serve_config_arguments(DEPLOY / "serve.yaml")

    assert args.listen == ("0.0.0.0", MONGODB_PORT)
    assert args.metrics_listen == ("0.0.0.0", METRICS_PORT)
    assert args.policy == Path(POLICY_PATH)
    assert args.log_format == "json"
    assert args.drain_timeout == 30
    assert args.max_connections == 10000
    assert args.tlsMode == "disabled"
    assert args.upstream == UPSTREAM_FOR_PARSING


def test_serve_yaml_has_no_upstream():
    """The upstream URI carries a password, so it comes from a Secret, never the file."""
    options = yaml.safe_load((DEPLOY / "serve.yaml").read_text())

    assert "upstream" not in options


def test_master_key_placeholder_is_rejected(tmp_path):
    secret = find_object(all_kubernetes_objects(), "Secret", "mongoveil-master-key")
    key_file = tmp_path / "master.key"
    key_file.write_text(secret["stringData"]["master.key"])

    with pytest.raises(MasterKeyError, match="not valid base64"):
        load_local_master_key(key_file)


def proxy_pod_specs() -> dict[str, dict]:
    """The Pod specs that run the mongoveil image, by the name of their object."""
    objects = all_kubernetes_objects()
    return {
        "standalone": pod_spec(find_object(objects, "Deployment", "mongoveil")),
        "sidecar": pod_spec(find_object(objects, "Deployment", "clinic-app")),
        "keys-init": pod_spec(find_object(objects, "Job", "mongoveil-keys-init")),
    }


def proxy_container(name: str, spec: dict) -> dict:
    return container(spec, "keys-init" if name == "keys-init" else "mongoveil")


@pytest.mark.parametrize("name", ["standalone", "sidecar", "keys-init"])
def test_proxy_pod_security(name):
    spec = proxy_pod_specs()[name]
    proxy = proxy_container(name, spec)

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert "securityContext" in proxy
    for pod_container in containers_of(spec):
        name = pod_container["name"]
        context = pod_container["securityContext"]
        resources = pod_container["resources"]
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert set(resources) == {"requests", "limits"}, name
        assert set(resources["requests"]) == {"cpu", "memory"}, name
        assert set(resources["limits"]) == {"cpu", "memory"}, name


@pytest.mark.parametrize("name", ["standalone", "sidecar", "keys-init"])
def test_proxy_reads_files_and_secrets(name):
    spec = proxy_pod_specs()[name]
    proxy = proxy_container(name, spec)
    mounts = {mount["mountPath"]: mount for mount in proxy["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}

    upstream = env_of(proxy)["MONGOVEIL_UPSTREAM"]
    assert upstream["valueFrom"]["secretKeyRef"] == {"name": "mongoveil-upstream", "key": "uri"}
    config = mounts["/etc/mongoveil"]
    assert config["readOnly"] is True
    sources = volumes[config["name"]]["projected"]["sources"]
    files = {item["path"]: (kind, source[kind]["name"], item["key"])
             for source in sources for kind in source for item in source[kind]["items"]}
    assert files["policy.yaml"] == ("configMap", "mongoveil-policy", "policy.yaml")
    assert files["keys/master.key"] == ("secret", "mongoveil-master-key", "master.key")
    if name != "keys-init":
        assert files["serve.yaml"] == ("configMap", "mongoveil-serve", "serve.yaml")
        assert "emptyDir" in volumes[mounts["/var/lib/mongoveil"]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_referenced_keys_exist():
    """Every secretKeyRef and ConfigMap or Secret item names a key the object defines."""
    objects = all_kubernetes_objects()
    defined = {(d["kind"], d["metadata"]["name"]): set(d.get("data", {})) | set(d.get("stringData", {}))
               for d in objects if d["kind"] in ("ConfigMap", "Secret")}
    references = []
    for spec in [pod_spec(d) for d in objects if d["kind"] in ("Deployment", "Job")]:
        for pod_container in containers_of(spec):
            for variable in pod_container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    references.append(("Secret", ref["name"], ref["key"]))
        for volume in spec["volumes"]:
            for source in volume.get("projected", {}).get("sources", []):
                for kind, ref in source.items():
                    object_kind = {"configMap": "ConfigMap", "secret": "Secret"}[kind]
                    references += [(object_kind, ref["name"], item["key"]) for item in ref["items"]]

    assert references
    for kind, name, key in references:
        assert key in defined[(kind, name)], f"{kind} {name} has no key {key}"


@pytest.mark.parametrize("name", ["standalone", "sidecar"])
def test_proxy_probes(name):
    proxy = container(proxy_pod_specs()[name], "mongoveil")
    ports = {port["name"]: port["containerPort"] for port in proxy["ports"]}

    assert ports["metrics"] == METRICS_PORT
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert proxy["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


@pytest.mark.parametrize("name", ["standalone", "sidecar"])
def test_grace_period_exceeds_drain_timeout(name):
    spec = proxy_pod_specs()[name]
    proxy = container(spec, "mongoveil")
    drain_timeout = yaml.safe_load((DEPLOY / "serve.yaml").read_text())["drain-timeout"]
    pre_stop = proxy.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    pre_stop_seconds = int(pre_stop[1]) if pre_stop else 0

    assert spec["terminationGracePeriodSeconds"] > drain_timeout + pre_stop_seconds


def test_sidecar_serves_localhost_only():
    spec = proxy_pod_specs()["sidecar"]
    proxy = container(spec, "mongoveil")
    app = container(spec, "app")
    args = serve_config_arguments(DEPLOY / "serve.yaml",
                                  {"MONGOVEIL_LISTEN": env_of(proxy)["MONGOVEIL_LISTEN"]["value"]})
    uri = urlsplit(env_of(app)["MONGODB_URI"]["value"])

    assert proxy in spec["initContainers"]
    assert proxy["restartPolicy"] == "Always"
    assert args.listen == ("127.0.0.1", MONGODB_PORT)
    assert uri.scheme == "mongodb"
    assert uri.hostname == "localhost"
    assert uri.port == MONGODB_PORT


def test_standalone_advertises_service():
    objects = all_kubernetes_objects()
    service = find_object(objects, "Service", "mongoveil")
    proxy = container(proxy_pod_specs()["standalone"], "mongoveil")

    advertise = env_of(proxy)["MONGOVEIL_ADVERTISE"]["value"]
    assert advertise == f"{service['metadata']['name']}.$(POD_NAMESPACE).svc:{MONGODB_PORT}"
    assert env_of(proxy)["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_services_reach_named_ports():
    """Each Service selects a Pod template whose containers name its target ports."""
    objects = all_kubernetes_objects()
    templates = [d["spec"]["template"] for d in objects if d["kind"] == "Deployment"]
    services = [d for d in objects if d["kind"] == "Service"]

    assert services
    for service in services:
        selected = [t for t in templates if matches(service["spec"]["selector"], t["metadata"]["labels"])]
        assert len(selected) == 1, service["metadata"]["name"]
        port_names = {port["name"] for pod_container in containers_of(selected[0]["spec"])
                      for port in pod_container.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port)


def test_job_pods_not_selected():
    """No Service, Deployment or PodDisruptionBudget selects the keys-init Job's Pods."""
    objects = all_kubernetes_objects()
    job_labels = find_object(objects, "Job", "mongoveil-keys-init")["spec"]["template"]["metadata"]["labels"]
    selectors = [d["spec"]["selector"] for d in objects if d["kind"] == "Service"]
    selectors += [d["spec"]["selector"]["matchLabels"] for d in objects
                  if d["kind"] in ("Deployment", "PodDisruptionBudget")]

    for selector in selectors:
        assert not matches(selector, job_labels), selector


def test_service_monitor_selects_metrics_services():
    objects = all_kubernetes_objects()
    monitor = find_object(objects, "ServiceMonitor", "mongoveil")
    selected = [d for d in objects if d["kind"] == "Service"
                and matches(monitor["spec"]["selector"]["matchLabels"], d["metadata"]["labels"])]

    assert {d["metadata"]["name"] for d in selected} == {"mongoveil", "clinic-app-mongoveil-metrics"}
    for service in selected:
        port_names = {port["name"] for port in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names
            assert endpoint["path"] == "/metrics"


# --- Helm chart ------------------------------------------------------------------------

TEMPLATES = CHART / "templates"
RENDER_COPIES = {
    "default.yaml": [],
    "sidecar.yaml": ["--set", "mode=sidecar", "--set", "serviceMonitor.enabled=true"],
}
SOURCE_LINE = re.compile(r"^# Source: mongoveil/templates/(\S+)$", re.MULTILINE)
VALUE_REFERENCE = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
INDEX_REFERENCE = re.compile(r'index \.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+) "([^"]+)"')


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def object_templates() -> list[Path]:
    """The templates that render Kubernetes objects (not helpers, not NOTES.txt)."""
    return sorted(path for path in TEMPLATES.glob("*.yaml"))


def rendered_by_source(copy: str) -> dict[str, list[dict]]:
    """Map each template file name to the objects that the rendered copy has from it."""
    text = (RENDERED / copy).read_text()
    objects: dict[str, list[dict]] = {}
    for chunk in re.split(r"^---\s*$", text, flags=re.MULTILINE):
        source = SOURCE_LINE.search(chunk)
        document = yaml.safe_load(chunk)
        if document is None:
            continue
        assert source, f"{copy}: an object without a '# Source:' line: {chunk[:80]!r}"
        objects.setdefault(source.group(1), []).append(document)
    return objects


def rendered_objects(copy: str) -> list[dict]:
    return [document for documents in rendered_by_source(copy).values() for document in documents]


def test_rendered_copies_cover_templates():
    sources = set()
    for copy in RENDER_COPIES:
        sources |= set(rendered_by_source(copy))

    assert sources == {path.name for path in object_templates()}


@pytest.mark.parametrize("copy", list(RENDER_COPIES))
def test_rendered_kinds_match_templates(copy):
    for source, documents in rendered_by_source(copy).items():
        template = (TEMPLATES / source).read_text()
        kinds = re.findall(r"^kind: (\S+)$", template, re.MULTILINE)
        api_versions = re.findall(r"^apiVersion: (\S+)$", template, re.MULTILINE)
        assert [d["kind"] for d in documents] == kinds, source
        assert [d["apiVersion"] for d in documents] == api_versions, source


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("copy", list(RENDER_COPIES))
def test_rendered_chart_validates(copy, version):
    for document in rendered_objects(copy):
        validate_object(document, version)


def test_template_values_exist():
    values = chart_values()
    referenced_top_level = set()

    for path in sorted(TEMPLATES.iterdir()):
        text = path.read_text()
        for match in VALUE_REFERENCE.finditer(text):
            keys = match.group(1).lstrip(".").split(".")
            referenced_top_level.add(keys[0])
            reference = f"{path.name}: .Values.{'.'.join(keys)}"
            node = values
            for key in keys:
                assert isinstance(node, dict), reference
                assert key in node, reference
                node = node[key]
        for match in INDEX_REFERENCE.finditer(text):
            keys = match.group(1).lstrip(".").split(".")
            assert match.group(2) in nested(values, tuple(keys)), f"{path.name}: {match.group(0)}"

    assert set(values) - referenced_top_level == set(), "values.yaml keys no template reads"


@pytest.mark.parametrize("path", sorted(TEMPLATES.iterdir()), ids=lambda path: path.name)
def test_template_actions_balanced(path):
    text = path.read_text()
    openers = re.findall(r"\{\{-?\s*(?:if|with|range|define|block)\b", text)
    ends = re.findall(r"\{\{-?\s*end\s*-?\}\}", text)

    assert text.count("{{") == text.count("}}")
    assert len(openers) == len(ends)


def test_default_render_reflects_values():
    values = chart_values()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    objects = rendered_objects("default.yaml")
    deployment = find_object(objects, "Deployment", "mongoveil")
    spec = pod_spec(deployment)
    proxy = container(spec, "mongoveil")

    assert deployment["spec"]["replicas"] == values["replicaCount"]
    assert proxy["image"] == f"{values['image']['repository']}:{chart['appVersion']}"
    assert proxy["resources"] == values["resources"]
    assert proxy["securityContext"] == values["securityContext"]
    assert spec["securityContext"] == values["podSecurityContext"]
    assert spec["terminationGracePeriodSeconds"] == values["terminationGracePeriodSeconds"]
    assert proxy["lifecycle"]["preStop"]["exec"]["command"] == \
        ["sleep", str(values["preStopSleepSeconds"])]
    for probe in ("startup", "liveness", "readiness"):
        settings = {k: v for k, v in proxy[f"{probe}Probe"].items() if k != "httpGet"}
        assert settings == values["probes"][probe], probe


def test_default_render_configuration():
    values = chart_values()
    objects = rendered_objects("default.yaml")
    serve = find_object(objects, "ConfigMap", "mongoveil-serve")
    policy = find_object(objects, "ConfigMap", "mongoveil-policy")
    deployment = find_object(objects, "Deployment", "mongoveil")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]

    assert yaml.safe_load(serve["data"]["serve.yaml"]) == values["serve"]
    assert yaml.safe_load(policy["data"]["policy.yaml"]) == \
        yaml.safe_load((CHART / "files" / "policy.yaml").read_text())
    # Helm's toYaml sorts keys like yaml.safe_dump for these plain scalars.
    serve_text = yaml.safe_dump(values["serve"], default_flow_style=False, sort_keys=True)
    assert annotations["checksum/serve"] == hashlib.sha256(serve_text.rstrip("\n").encode()).hexdigest()


def test_default_render_secrets():
    values = chart_values()
    objects = rendered_objects("default.yaml")
    master_key = find_object(objects, "Secret", "mongoveil-master-key")
    upstream = find_object(objects, "Secret", "mongoveil-upstream")

    assert base64.b64decode(master_key["data"]["master.key"]).decode() == values["masterKey"]["value"]
    assert base64.b64decode(upstream["data"]["uri"]).decode() == values["upstream"]["uri"]


def test_chart_master_key_placeholder_is_rejected(tmp_path):
    key_file = tmp_path / "master.key"
    key_file.write_text(chart_values()["masterKey"]["value"])

    with pytest.raises(MasterKeyError, match="not valid base64"):
        load_local_master_key(key_file)


def test_chart_policy_is_kubernetes_policy():
    configmap = find_object(all_kubernetes_objects(), "ConfigMap", "mongoveil-policy")

    assert yaml.safe_load((CHART / "files" / "policy.yaml").read_text()) == \
        yaml.safe_load(configmap["data"]["policy.yaml"])


def comparable_container(container_spec: dict) -> dict:
    """The parts of a proxy container that the chart and the plain manifests share."""
    return {
        "ports": container_spec["ports"],
        "probes": {k: container_spec[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")},
        "securityContext": container_spec["securityContext"],
        "resources": container_spec["resources"],
        "mounts": sorted(mount["mountPath"] for mount in container_spec["volumeMounts"]),
        "env": sorted(env_of(container_spec)),
        "restartPolicy": container_spec.get("restartPolicy"),
    }


@pytest.mark.parametrize("copy, plain_name", [("default.yaml", "mongoveil"), ("sidecar.yaml", "clinic-app")])
def test_chart_matches_plain_manifests(copy, plain_name):
    plain = pod_spec(find_object(all_kubernetes_objects(), "Deployment", plain_name))
    rendered = pod_spec(find_object(rendered_objects(copy), "Deployment", "mongoveil"))

    assert comparable_container(container(rendered, "mongoveil")) == \
        comparable_container(container(plain, "mongoveil"))
    assert rendered["securityContext"] == plain["securityContext"]
    assert bool(rendered.get("initContainers")) == bool(plain.get("initContainers"))


def test_sidecar_render_has_app_container():
    values = chart_values()
    spec = pod_spec(find_object(rendered_objects("sidecar.yaml"), "Deployment", "mongoveil"))
    app = container(spec, values["app"]["name"])

    assert [c["name"] for c in spec["containers"]] == [values["app"]["name"]]
    assert app["image"] == values["app"]["image"]
    assert urlsplit(env_of(app)["MONGODB_URI"]["value"]).netloc == f"localhost:{MONGODB_PORT}"


@pytest.mark.skipif(shutil.which("helm") is None,
                    reason="helm is not on PATH; it cannot be installed from the package "
                           "registries here, so the rendered copies are checked by hand")
@pytest.mark.parametrize("copy", list(RENDER_COPIES))
def test_rendered_copy_matches_helm(copy):
    command = ["helm", "template", "mongoveil", str(CHART), "--namespace", "mongoveil",
               *RENDER_COPIES[copy]]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout

    def by_identity(documents):
        return sorted(documents, key=lambda d: (d["kind"], d["metadata"]["name"]))

    helm_documents = [d for d in yaml.safe_load_all(output) if d]
    assert by_identity(helm_documents) == by_identity(rendered_objects(copy))


# --- Dockerfile ------------------------------------------------------------------------

def dockerfile_stages() -> list[list[dict]]:
    """The Dockerfile's instructions, one list per build stage."""
    with (DEPLOY / "Dockerfile").open("rb") as stream:
        structure = DockerfileParser(fileobj=stream).structure
    stages: list[list[dict]] = []
    for instruction in structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def instructions(stage: list[dict], name: str) -> list[str]:
    return [instruction["value"] for instruction in stage if instruction["instruction"] == name]


def test_dockerfile_base_images():
    stages = dockerfile_stages()

    assert len(stages) == 2
    for stage in stages:
        assert instructions(stage, "FROM")[0].split()[0] == "python:3.11-slim"


def test_dockerfile_runs_as_non_root():
    final = dockerfile_stages()[-1]
    users = instructions(final, "USER")

    assert len(users) == 1
    user, _, group = users[0].partition(":")
    assert user.isdigit()
    assert int(user) != 0
    assert group.isdigit()
    assert int(group) != 0
    user_index = [instruction["instruction"] for instruction in final].index("USER")
    later = [instruction["instruction"] for instruction in final[user_index:]]
    assert "RUN" not in later


def test_dockerfile_entrypoint_and_ports():
    final = dockerfile_stages()[-1]

    assert json.loads(instructions(final, "ENTRYPOINT")[0]) == ["mongoveil"]
    assert json.loads(instructions(final, "CMD")[0]) == ["serve", "--config", SERVE_CONFIG_PATH]
    assert instructions(final, "EXPOSE")[0].split() == [str(MONGODB_PORT), str(METRICS_PORT)]


def test_dockerfile_installs_kms_extra():
    build = dockerfile_stages()[0]
    runs = " ".join(instructions(build, "RUN"))

    assert re.search(r"pip install [\"']?\.\[kms\][\"']?", runs)


def test_dockerfile_final_stage_has_no_build_tools():
    final = dockerfile_stages()[-1]
    runs = " ".join(instructions(final, "RUN"))
    copies = instructions(final, "COPY")

    assert not re.search(r"apt-get|pip install|gcc|build-essential", runs)
    assert any(copy.startswith("--from=build /opt/mongoveil") for copy in copies)


def test_dockerfile_copies_existing_files():
    ignore_lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    included = {line[1:] for line in ignore_lines if line.startswith("!")}
    sources = []
    for stage in dockerfile_stages():
        for copy in instructions(stage, "COPY"):
            if not copy.startswith("--from="):
                sources += copy.split()[:-1]

    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in included, f"{source} is excluded by Dockerfile.dockerignore"


def healthcheck_command() -> list[str]:
    final = dockerfile_stages()[-1]
    healthcheck = instructions(final, "HEALTHCHECK")
    assert len(healthcheck) == 1
    command = healthcheck[0].split("CMD", 1)[1].strip()
    return json.loads(command)


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    """Stands in for the proxy's HTTP listener: /healthz returns the server's status."""

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        self.send_response(self.server.health_status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _HealthHandler)
    server.health_status = 200
    thread = threading.Thread(target=server.serve_forever, name="health-stand-in", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("status, exit_code", [(200, 0), (503, 1)])
def test_healthcheck_command(health_server, status, exit_code):
    """The HEALTHCHECK one-liner exits 0 on 200 and non-zero on an error status.

    The command is run as written, with only the port moved to the stand-in's.
    """
    command = healthcheck_command()
    address = f"127.0.0.1:{METRICS_PORT}/healthz"
    assert command[0] == "python"
    assert not any("curl" in part for part in command)
    assert address in command[-1]
    script = command[-1].replace(address, f"127.0.0.1:{health_server.server_port}/healthz")
    health_server.health_status = status

    result = subprocess.run([sys.executable, *command[1:-1], script], capture_output=True,
                            timeout=30)

    assert result.returncode == exit_code


def test_image_default_config_is_serve_yaml():
    final = dockerfile_stages()[-1]

    assert f"deploy/serve.yaml {SERVE_CONFIG_PATH}" in instructions(final, "COPY")


# --- docker compose --------------------------------------------------------------------

def compose_file() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def compose_environment(service: dict) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return environment


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Replace ${NAME} and ${NAME:?message} as docker compose does when NAME is set."""
    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda match: variables[match.group(1)], text)


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each bind mount; named volumes are left out."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts.append((source, target))
    return mounts


def test_compose_services():
    services = compose_file()["services"]

    assert set(services) == {"mongod", "keys-init", "proxy", "prometheus"}
    assert services["mongod"]["image"] == "mongo:7"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["proxy"]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert services["keys-init"]["build"] == services["proxy"]["build"]


def test_compose_mongod_authentication():
    mongod = compose_file()["services"]["mongod"]
    environment = compose_environment(mongod)

    assert environment["MONGO_INITDB_ROOT_USERNAME"] == "root"
    assert environment["MONGO_INITDB_ROOT_PASSWORD"].startswith("${MONGO_ROOT_PASSWORD:?")
    assert environment["MONGOVEIL_SERVICE_PASSWORD"].startswith("${MONGOVEIL_SERVICE_PASSWORD:?")
    assert ("./mongo-init.js", "/docker-entrypoint-initdb.d/mongo-init.js") in bind_mounts(mongod)


def test_compose_proxy_configuration(tmp_path):
    services = compose_file()["services"]
    proxy = services["proxy"]
    environment = compose_environment(proxy)
    upstream = urlsplit(interpolate(environment["MONGOVEIL_UPSTREAM"],
                                    {"MONGOVEIL_SERVICE_PASSWORD": "service-secret"}))
    # The policy path from the environment overrides the one in serve.yaml.
    args = serve_config_arguments(DEPLOY / "serve.yaml",
                                  {"MONGOVEIL_POLICY": environment["MONGOVEIL_POLICY"]})

    assert upstream.username == SERVICE.name
    assert upstream.password == "service-secret"
    assert upstream.hostname == "mongod"
    assert "authSource=admin" in upstream.query
    assert args.policy == Path("/var/lib/mongoveil/policy.yaml")
    assert ("../policies/healthcare.yaml", environment["MONGOVEIL_POLICY"]) in bind_mounts(proxy)
    assert ("./serve.yaml", SERVE_CONFIG_PATH) in bind_mounts(proxy)
    assert "mongoveil-data:/var/lib/mongoveil" in proxy["volumes"]
    assert proxy["depends_on"]["keys-init"]["condition"] == "service_completed_successfully"
    assert f"127.0.0.1:{MONGODB_PORT}:{MONGODB_PORT}" in proxy["ports"]
    assert f"127.0.0.1:{METRICS_PORT}:{METRICS_PORT}" in proxy["ports"]
    drain_timeout = yaml.safe_load((DEPLOY / "serve.yaml").read_text())["drain-timeout"]
    assert _seconds(proxy["stop_grace_period"]) > drain_timeout


def test_compose_keys_init():
    services = compose_file()["services"]
    keys_init = services["keys-init"]

    assert keys_init["command"][:2] == ["keys", "init"]
    assert keys_init["command"][2:] == ["--policy", compose_environment(keys_init)["MONGOVEIL_POLICY"]]
    assert keys_init["volumes"] == services["proxy"]["volumes"][:2]
    assert keys_init["depends_on"]["mongod"]["condition"] == "service_healthy"


def test_compose_bind_mount_sources_exist():
    compose = compose_file()

    for name, service in compose["services"].items():
        for source, _target in bind_mounts(service):
            assert (DEPLOY / source).exists(), f"{name}: {source}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"


def test_prometheus_scrapes_proxy():
    compose = compose_file()
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [target for job in config["scrape_configs"] for static in job["static_configs"]
               for target in static["targets"]]

    assert targets == [f"proxy:{METRICS_PORT}"]
    assert config["scrape_configs"][0]["metrics_path"] == "/metrics"
    assert ("./prometheus.yml", "/etc/prometheus/prometheus.yml") in \
        bind_mounts(compose["services"]["prometheus"])


# --- mongo-init.js ---------------------------------------------------------------------

def init_script_users() -> dict[str, tuple[str, str, list[tuple[str, str]]]]:
    """The users array of mongo-init.js: name -> (database, password, roles)."""
    text = (DEPLOY / "mongo-init.js").read_text()
    entries = re.findall(r'^\s*\["(\w+)", "(\w+)", ("[\w-]+"|\w+), \[(.*)\]\],$', text, re.MULTILINE)
    users = {}
    for name, database, password, roles in entries:
        users[name] = (database, password.strip('"'), re.findall(r'\["(\w+)", "(\w+)"\]', roles))
    return users


def test_init_script_matches_demo_users():
    users = init_script_users()

    assert set(users) == {user.name for user in DEMO_USERS}
    for user in DEMO_USERS:
        database, password, roles = users[user.name]
        assert database == user.database, user.name
        assert roles == list(user.roles), user.name
        if user is SERVICE:
            assert password == "servicePassword"
        else:
            assert password == user.password, user.name


def test_init_script_matches_demo_roles():
    text = (DEPLOY / "mongo-init.js").read_text()
    roles = dict(re.findall(r'^\s*(\w+): "(\w+)",$', text, re.MULTILINE))

    assert roles == CLINIC_ROLES


def test_init_script_creates_users(secantus_uri, tmp_path):
    """mongosh runs mongo-init.js as the mongo image's entrypoint would."""
    if not MONGOSH.is_file():
        pytest.fail(f"{MONGOSH} is missing: run `make test`, which runs "
                    "`npm ci --prefix tests/clients` first")
    environment = dict(os.environ, HOME=str(tmp_path), MONGOVEIL_SERVICE_PASSWORD="service-secret",
                       MONGOSH_TELEMETRY_ENDPOINT="", MONGOSH_FORCE_DISABLE_TELEMETRY_FOR_TESTING="1")
    command = [str(MONGOSH), secantus_uri, "--quiet", "--norc", "--file", str(DEPLOY / "mongo-init.js")]

    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    client: MongoClient = MongoClient(secantus_uri)
    try:
        for user in DEMO_USERS:
            info = client[user.database].command("usersInfo", user.name)["users"]
            assert len(info) == 1, user.name
            roles = {(role["role"], role["db"]) for role in info[0]["roles"]}
            assert roles == set(user.roles), user.name
        roles_info = client["clinic"].command("rolesInfo", 1)["roles"]
        assert {role["role"] for role in roles_info} >= set(CLINIC_ROLES)
    finally:
        client.close()


def test_init_script_requires_service_password(secantus_uri, tmp_path):
    if not MONGOSH.is_file():
        pytest.fail(f"{MONGOSH} is missing: run `make test`")
    environment = {key: value for key, value in os.environ.items()
                   if key != "MONGOVEIL_SERVICE_PASSWORD"}
    environment.update(HOME=str(tmp_path), MONGOSH_TELEMETRY_ENDPOINT="",
                       MONGOSH_FORCE_DISABLE_TELEMETRY_FOR_TESTING="1")
    command = [str(MONGOSH), secantus_uri, "--quiet", "--norc", "--file", str(DEPLOY / "mongo-init.js")]

    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)

    assert result.returncode != 0
    assert "MONGOVEIL_SERVICE_PASSWORD is not set" in result.stderr + result.stdout


# --- README ----------------------------------------------------------------------------

def readme_deployment_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Deployment\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Deployment' section"
    return match.group(1)


def deployment_files() -> list[str]:
    """The files that the README's deployment section must name, relative to the repository."""
    files = [path for path in DEPLOY.iterdir() if path.is_file()]
    files += kubernetes_manifests() + [KUBERNETES / "kustomization.yaml"]
    files += sorted(RENDERED.glob("*.yaml")) + sorted((DEPLOY / "grafana").glob("*.json"))
    files += [CHART / "Chart.yaml", CHART / "values.yaml"]
    return sorted(str(path.relative_to(ROOT)) for path in files)


def test_readme_names_deployment_files():
    section = readme_deployment_section()

    for name in deployment_files():
        short = name.removeprefix("deploy/kubernetes/").removeprefix("deploy/helm/")
        assert name in section or f"`{short}`" in section, f"README's deployment section lacks {name}"
    assert "deploy/helm/mongoveil" in section
