"""The Kubernetes files (infra/kubernetes/) hold together, read as files: no cluster, no server.

Every YAML document parses; every object is in the namespace the README creates; the workloads take their
passwords and keys only from Secrets (never a literal value, never on a command line, no Secret object in the
repository); the Services that the README's settings and the manifests' own addresses name exist, on those ports;
the README applies every manifest and creates every Secret the manifests read; and every cliploop command and
configuration key the README uses exists.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "infra" / "kubernetes"
README = (KUBE / "README.md").read_text(encoding="utf-8")
NAMESPACE = "cliploop"
# The servers' Services and ports, as infra/kubernetes/README.md draws them (checked against the manifests and
# against every address the README and the manifests use).
SERVICES = {"cliploop-postgres": 5432, "cliploop-mlflow": 5000, "cliploop-prefect": 4200}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
WORKLOADS = {"Deployment", "StatefulSet"}
CREDENTIAL = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY", re.IGNORECASE)
URI = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\"',()\[\]<>`]+")


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                out.append((path.name, doc))
    return out


def objects() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in documents() if "kind" in doc]


def job_template() -> dict:
    (template,) = [doc for _, doc in documents() if "job_configuration" in doc]
    return template


def containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def services() -> dict[str, set[int]]:
    return {
        obj["metadata"]["name"]: {port["port"] for port in obj["spec"]["ports"]}
        for _, obj in objects()
        if obj["kind"] == "Service"
    }


def code_blocks(language: str | None = None) -> list[str]:
    fence = r"```" + (re.escape(language) if language else r"[a-z]*") + r"\n(.*?)```"
    return re.findall(fence, README, re.DOTALL)


def with_continuations(text: str) -> str:
    return re.sub(r"\\\n\s*", " ", text)


def test_every_document_parses_and_is_a_kubernetes_object_or_the_job_template():
    files = sorted(path.name for path in KUBE.glob("*.yaml"))
    assert {"postgres.yaml", "mlflow.yaml", "prefect-server.yaml", "orchestrator.yaml", "gpu-worker.yaml"} <= set(files)
    docs = documents()
    assert sorted({name for name, _ in docs}) == files  # no file without a document
    for name, doc in docs:
        assert isinstance(doc, dict), name
        if "job_configuration" in doc:  # a Prefect base job template; Prefect reads it as JSON (README step 5)
            assert set(doc) == {"job_configuration", "variables"}, name
            assert json.loads(json.dumps(doc)) == doc
        else:
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), name


def test_every_object_is_in_the_namespace_the_readme_creates():
    assert f"kubectl create namespace {NAMESPACE}" in README
    for name, obj in objects():
        where = f"{name}: {obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] in CLUSTER_SCOPED:
            continue
        assert obj["metadata"].get("namespace") == NAMESPACE, where
        for subject in obj.get("subjects", []):
            assert subject.get("namespace") == NAMESPACE, where
    template = job_template()
    assert template["variables"]["properties"]["namespace"]["default"] == NAMESPACE
    assert template["job_configuration"]["job_manifest"]["metadata"]["namespace"] == "{{ namespace }}"


def _uri_credentials(text: str) -> list[str]:
    return [uri for uri in URI.findall(text) if urlsplit(uri).password is not None]


def test_workloads_take_passwords_and_keys_from_secrets_only():
    workloads = [(name, obj) for name, obj in objects() if obj["kind"] in WORKLOADS]
    assert len(workloads) >= 5
    for name, workload in workloads:
        for container in containers(workload):
            where = f"{name}: {workload['metadata']['name']}/{container['name']}"
            for env in container.get("env", []):
                if CREDENTIAL.search(env["name"]):
                    assert "value" not in env, f"{where}: {env['name']} has a literal value"
                    assert "secretKeyRef" in env["valueFrom"], f"{where}: {env['name']} not from a Secret"
                if "value" in env:
                    assert not _uri_credentials(str(env["value"])), f"{where}: a password in {env['name']}"
            for source in container.get("envFrom", []):
                assert set(source) == {"secretRef"}, f"{where}: envFrom takes Secrets only"
            words = " ".join(str(word) for word in container.get("command", []) + container.get("args", []))
            assert not re.search("password|passwd", words, re.IGNORECASE), f"{where}: a password on the command line"
            assert not _uri_credentials(words), f"{where}: a URI with a password on the command line"
    kinds = {obj["kind"] for _, obj in objects()}
    assert "Secret" not in kinds  # made by hand (README step 3), never in the repository
    for name, obj in objects():
        if obj["kind"] == "ConfigMap":
            assert not any(CREDENTIAL.search(key) for key in obj.get("data", {})), name
            assert not _uri_credentials(json.dumps(obj.get("data", {}))), name


def test_the_mlflow_server_runs_without_mlflows_job_runner_as_the_local_stack_does():
    """cliploop starts no MLflow job (MLflow's GenAI jobs); the runner would be three more processes per pod."""
    servers = [
        container
        for _, obj in objects()
        if obj["kind"] in WORKLOADS
        for container in containers(obj)
        if container.get("command", [])[:2] == ["mlflow", "server"]
    ]
    assert servers
    for container in servers:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION") == "false", container["name"]


def test_every_secret_the_manifests_read_is_created_in_the_readme():
    created: dict[str, set[str]] = {}
    for block in code_blocks("bash"):
        for secret, rest in re.findall(r"create secret generic (\S+)([^\n]*)", with_continuations(block)):
            created[secret] = set(re.findall(r"--from-literal=([A-Za-z_]+)=", rest))
    assert created, "the README creates no Secret"
    read: set[tuple[str, str | None]] = set()
    for _, workload in objects():
        if workload["kind"] not in WORKLOADS | {"RayCluster"}:
            continue
        for match in re.finditer(r"'secretKeyRef': \{'name': '([^']+)', 'key': '([^']+)'", str(workload)):
            read.add((match.group(1), match.group(2)))
        for match in re.finditer(r"'secretRef': \{'name': '([^']+)'\}", str(workload)):
            read.add((match.group(1), None))
    read.add((job_template()["variables"]["properties"]["s3_secret"]["default"], None))
    assert ("cliploop-postgres", "password") in read and ("cliploop-s3", None) in read
    for secret, key in read:
        assert secret in created, f"the README does not create the Secret {secret}"
        assert key is None or key in created[secret], f"the README's Secret {secret} has no key {key}"


def test_the_servers_services_exist_on_their_ports():
    found = services()
    for name, port in SERVICES.items():
        assert port in found.get(name, set()), f"no Service {name} on port {port}"


def _addresses(text: str) -> list[tuple[str, int | None]]:
    out = []
    for uri in URI.findall(text):
        parts = urlsplit(uri)
        if parts.hostname and parts.hostname.startswith("cliploop-"):
            out.append((parts.hostname, parts.port))
    return out


def test_every_cluster_address_names_a_service_of_the_manifests():
    """The README's cliploop.yaml settings (mlflow.tracking_uri, compute.ray_address), its PREFECT_API_URL, and the
    manifests' own URIs (the servers' databases, the workers' Prefect API) each name a Service and its port."""
    found = services()
    (ray,) = [obj for _, obj in objects() if obj["kind"] == "RayCluster"]
    head = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    # KubeRay names the head's Service <cluster>-head-svc, with the head container's ports.
    found[f"{ray['metadata']['name']}-head-svc"] = {port["containerPort"] for port in head["ports"]}
    settings = [yaml.safe_load(block) for block in code_blocks("yaml")]
    tracking = [doc["mlflow"]["tracking_uri"] for doc in settings if "mlflow" in doc]
    ray_address = [doc["compute"]["ray_address"] for doc in settings if "compute" in doc]
    assert tracking == [f"http://cliploop-mlflow:{SERVICES['cliploop-mlflow']}"]
    assert ray_address and all(address.startswith("ray://") for address in ray_address)
    manifest_text = "\n".join(path.read_text(encoding="utf-8") for path in sorted(KUBE.glob("*.yaml")))
    named = _addresses(README) + _addresses(manifest_text)
    hosts = {host for host, _ in named}
    assert {"cliploop-mlflow", "cliploop-prefect", "cliploop-postgres", "cliploop-ray-head-svc"} <= hosts
    for host, port in named:
        assert host in found, f"{host} is not a Service of infra/kubernetes/"
        assert port is None or port in found[host], f"{host} has no port {port}"


def test_the_readme_applies_every_manifest_and_names_only_files_that_exist():
    commands = with_continuations("\n".join(code_blocks("bash")))
    applied = set(re.findall(r"kubectl apply(?: -f infra/kubernetes/([\w.-]+\.yaml))", commands))
    applied |= set(re.findall(r"-f infra/kubernetes/([\w.-]+\.yaml)", commands))
    manifests = {name for name, _ in objects()}
    assert manifests == applied, f"not applied: {manifests - applied}; not files: {applied - manifests}"
    for named in re.findall(r"infra/kubernetes/([\w.-]+\.yaml)", README):
        assert (KUBE / named).is_file(), named
    assert "--base-job-template" in commands and "gpu-job-template.yaml" in commands


def _cliploop_commands() -> dict[str, set[str]]:
    from flows.cli import build_parser

    parser = build_parser()
    (sub,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return {
        name: {option for action in command._actions for option in action.option_strings}
        for name, command in sub.choices.items()
    }


def test_every_cliploop_command_and_option_of_the_readme_exists():
    known = _cliploop_commands()
    snippets = [with_continuations(block) for block in code_blocks()] + re.findall(r"`(cliploop [^`]+)`", README)
    used = []
    for snippet in snippets:
        for line in snippet.splitlines():
            for match in re.finditer(r"(?<![\w./-])(?<!-n )(?<!namespace )cliploop ([a-z][a-z-]*)([^|;&#`]*)", line):
                command, rest = match.group(1), match.group(2)
                used.append(command)
                assert command in known, f"`cliploop {command}` is not a cliploop command"
                for option in re.findall(r"(?<!\S)(--?[a-z][a-z-]*)", rest):
                    assert option in known[command], f"`cliploop {command}` has no option {option}"
    assert {"init", "config", "deploy", "status", "approve", "stack"} <= set(used)


def test_the_readme_settings_are_keys_of_the_configuration():
    from components.settings.config import Config

    blocks = [yaml.safe_load(block) for block in code_blocks("yaml")]
    assert blocks
    for block in blocks:
        Config.model_validate(block)  # extra keys are refused (each section forbids them)
    cluster = next(block for block in blocks if "mlflow" in block)
    assert cluster["orchestration"]["gpu_pool"] == "gpu"
    assert cluster["dvc"]["remote"].startswith("s3://") and cluster["artifacts"]["root"].startswith("s3://")
    assert cluster["drop_zone"].startswith("s3://")
    assert "prefect work-pool create cpu --type process" in README
    assert "prefect work-pool create gpu --type kubernetes" in README
