"""The deployment files agree with the code they deploy.

Nothing here can be built or applied on a test machine (no container engine, no cluster),
so the files are checked against the real sources of truth instead: the flags and
defaults of ``crossfield serve`` (its argparse parser), the metric families of
``crossfield.server.metrics``, the gRPC service names, and each other (labels and
selectors, ports, secret keys, paths inside the image). Prometheus' relabelling is run on
pods as Kubernetes discovery would describe them, and every PromQL expression is parsed.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import grpc
import promql_parser
import pytest
import tomllib
import yaml

from crossfield.server import cli as serve_cli
from crossfield.server.metrics import Metrics
from crossfield.v1 import inference_pb2

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# Labels that Prometheus itself or our relabelling attaches to every scraped series.
TARGET_LABELS = {"instance", "job", "namespace", "pod", "node", "cluster"}
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
STATUS_NAMES = {code.name for code in grpc.StatusCode}


# -- helpers ----------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def instruction(name: str) -> list[str]:
    return [rest for keyword, rest in dockerfile() if keyword == name]


def exec_form(text: str) -> list[str]:
    words = json.loads(text)
    assert isinstance(words, list), f"expected the exec (JSON) form, got {text!r}"
    return words


def serve(*arguments: str) -> argparse.Namespace:
    """``crossfield serve ARGUMENTS`` as the real command parses them (exits on a bad flag)."""
    parser = argparse.ArgumentParser(prog="crossfield")
    serve_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *arguments])


def image_command() -> list[str]:
    """ENTRYPOINT + CMD: what ``docker run IMAGE`` executes."""
    (entrypoint,) = instruction("ENTRYPOINT")
    (command,) = instruction("CMD")
    return exec_form(entrypoint) + exec_form(command)


def manifests(folder: Path = KUBERNETES) -> dict[str, list[dict[str, Any]]]:
    """kind -> documents of every manifest in ``folder`` (not the kustomizations)."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= document.keys(), path.name
            by_kind.setdefault(document["kind"], []).append(document)
    return by_kind


def only(kind: str) -> dict[str, Any]:
    (document,) = manifests()[kind]
    return document


def server_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """The RFC 6902 subset kustomize overlays use here: add (``-`` appends) and replace."""
    document = copy.deepcopy(document)
    for operation in operations:
        *parents, last = operation["path"].strip("/").split("/")
        target = document
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if operation["op"] == "add" and isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), operation["value"])
        elif operation["op"] in ("add", "replace"):
            if operation["op"] == "replace":
                assert last in target, f"replace of missing {operation['path']}"
            target[last] = operation["value"]
        else:
            raise AssertionError(f"unsupported patch operation {operation['op']}")
    return document


def tls_deployment(mutual: bool = False) -> dict[str, Any]:
    """The tls/ overlay applied to the base Deployment; ``mutual`` adds the operations its
    comment gives for mutual TLS."""
    overlay = yaml.safe_load((KUBERNETES / "tls" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../"]
    (patch,) = overlay["patches"]
    assert (patch["target"]["kind"], patch["target"]["name"]) == ("Deployment", "crossfield")
    text = (KUBERNETES / "tls" / patch["path"]).read_text()
    operations = yaml.safe_load(text)
    if mutual:
        commented = re.findall(r"^#   (- .*(?:\n#      .*)*)", text, flags=re.MULTILINE)
        extra = "\n".join(block.replace("\n#      ", "\n    ") for block in commented)
        operations += yaml.safe_load(extra)
    return json_patch(only("Deployment"), operations)


def metric_families() -> dict[str, tuple[str, set[str]]]:
    """Every series name the server exposes -> (family, its label names)."""
    metrics = Metrics()
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
    }
    labels = {
        collector._name: set(collector._labelnames)
        for collector in vars(metrics).values()
        if hasattr(collector, "_labelnames")
    }
    names = {}
    for family in metrics.registry.collect():
        for suffix in suffixes[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            names[family.name + suffix] = (family.name, labels[family.name] | extra)
    return names


def promql_expressions() -> list[tuple[str, str]]:
    """(where, expression) of every dashboard panel target and alert rule, with Grafana's
    variables replaced by values Prometheus would see."""
    found = []
    dashboard = json.loads((DEPLOY / "grafana" / "crossfield.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expression = (
                target["expr"]
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$model", ".*")
                .replace("$instance", ".*")
            )
            found.append((f"panel {panel['title']!r}", expression))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["definition"])
            assert match, variable["definition"]
            found.append(
                (f"variable {variable['name']}", match.group(1).replace("$instance", ".*"))
            )
    for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            found.append((f"alert {rule['alert']}", rule["expr"]))
    return found


def selectors_and_groupings(expression: str) -> tuple[list[Any], set[str]]:
    """The vector selectors of a PromQL expression and every label it groups or matches on."""
    selectors, grouping = [], set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        modifier = getattr(node, "modifier", None)
        if isinstance(node, promql_parser.AggregateExpr) and modifier is not None:
            grouping.update(modifier.labels)
        if isinstance(node, promql_parser.BinaryExpr) and modifier is not None:
            matching = modifier.matching
            if matching is not None:
                grouping.update(matching.labels)

    promql_parser.walk(promql_parser.parse(expression), visit)
    return selectors, grouping


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabelling (keep, drop, replace) of one target; None when dropped."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if action == "keep" and not match or action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$(\d+)", r"\\g<\1>", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
    return labels


def discovered_pod(deployment: dict[str, Any], ip: str) -> list[dict[str, str]]:
    """The targets Kubernetes pod discovery yields for a running pod of ``deployment``:
    one per container port, with the pod's labels and annotations as meta labels."""
    template = deployment["spec"]["template"]

    def sanitise(name: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", name)

    meta = {
        "__meta_kubernetes_namespace": "crossfield",
        "__meta_kubernetes_pod_name": "crossfield-7d9f-abcde",
        "__meta_kubernetes_pod_node_name": "gpu-node-1",
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_phase": "Running",
        "__metrics_path__": "/metrics",
    }
    for key, value in template["metadata"]["labels"].items():
        meta[f"__meta_kubernetes_pod_label_{sanitise(key)}"] = value
    for key, value in template["metadata"]["annotations"].items():
        meta[f"__meta_kubernetes_pod_annotation_{sanitise(key)}"] = value
    host = f"[{ip}]" if ":" in ip else ip
    return [
        {**meta, "__address__": f"{host}:{port['containerPort']}"}
        for port in server_container(deployment)["ports"]
    ]


# -- the image --------------------------------------------------------------------------------
def test_image_runs_the_torch_the_tests_run_as_a_non_root_user() -> None:
    (base,) = [rest for keyword, rest in dockerfile() if keyword == "ARG" and "IMAGE" in rest]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.\d+-slim-\w+", base)
    assert instruction("FROM") == ["${PYTHON_IMAGE}"]
    (pin,) = [rest for keyword, rest in dockerfile() if keyword == "ARG" and "TORCH" in rest]
    tested = re.findall(r"pip install torch==([\w.+]+)", (ROOT / ".ci" / "run").read_text())
    readme = set(re.findall(r"pip install torch==([\w.+]+)", (ROOT / "README.md").read_text()))
    assert tested and readme == set(tested), "README and CI install one torch"
    assert pin == f"TORCH_VERSION={tested[0]}", "the image runs the torch the tests run"
    keywords = [keyword for keyword, _ in dockerfile()]
    (user,) = instruction("USER")
    uid = user.partition(":")[0]
    assert uid.isdigit() and int(uid) != 0, "run as a numeric non-root uid (runAsNonRoot)"
    assert any(f"--uid {uid}" in rest for rest in instruction("RUN")), "create the user"
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    (install,) = [rest for rest in instruction("RUN") if "pip install" in rest]
    assert '"torch==${TORCH_VERSION}"' in install
    assert '".[server]"' in install and "--constraint" in install and "torch==" in install


def test_image_command_is_a_valid_serve_command_on_the_repository_volume() -> None:
    command = image_command()
    assert command[:2] == ["crossfield", "serve"]
    args = serve(*command[2:])
    defaults = serve()
    assert args.repo == Path("/models")
    assert instruction("VOLUME") == ['["/models"]']
    assert "XDG_CACHE_HOME=/cache" in instruction("ENV")  # the compile cache, owned by 10001
    exposed = {int(port) for rest in instruction("EXPOSE") for port in rest.split()}
    assert exposed == {args.port, args.metrics_port} == {defaults.port, defaults.metrics_port}


def test_image_healthcheck_runs_the_copied_grpc_health_script() -> None:
    (healthcheck,) = instruction("HEALTHCHECK")
    command = exec_form(healthcheck.partition("CMD")[2].strip())
    copies = [shlex.split(rest) for rest in instruction("COPY")]
    installed = {words[-1]: words[-2] for words in copies}
    assert command[0] == "python" and installed[command[1]] == "deploy/healthcheck.py"
    assert "--start-period" in healthcheck, "model loading must not count as failures"


def test_image_copies_every_package_folder_and_the_context_allows_them() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {path.split("/")[0] for path in project["tool"]["setuptools"]["package-dir"].values()}
    copies = [shlex.split(rest) for rest in instruction("COPY")]
    sources = {
        source.rstrip("/")
        for words in copies
        for source in words[:-1]
        if not source.startswith("--")
    }
    assert folders | {"pyproject.toml", project["project"]["readme"]} <= sources
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in ignore, "the context is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for source in sources:
        assert source in allowed, f"COPY {source}: excluded by .dockerignore"
        assert (ROOT / source).exists(), f"COPY {source}: no such path"


# -- Kubernetes -------------------------------------------------------------------------------
def test_manifests_have_the_expected_kinds_and_kustomize_lists_them() -> None:
    found = manifests()
    assert {"Namespace", "PersistentVolumeClaim", "Deployment", "Service"} <= found.keys()
    assert {"PodDisruptionBudget", "Secret"} <= found.keys()
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    # Secrets are created with kubectl; the example only shows their shape.
    assert listed == on_disk - {"secrets.example.yaml"}
    (image,) = kustomization["images"]
    assert image["name"] == server_container(only("Deployment"))["image"]
    assert only("Namespace")["metadata"]["name"] == kustomization["namespace"]


def test_selectors_match_the_pod_labels() -> None:
    deployment = only("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": only("Service")["spec"]["selector"],
        "PodDisruptionBudget": only("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for spread in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        selectors["topologySpreadConstraints"] = spread["labelSelector"]["matchLabels"]
    for kind, selector in selectors.items():
        assert selector and selector.items() <= pod_labels.items(), kind
    assert only("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_replicas_have_a_gpu_each_limits_and_run_as_the_image_user() -> None:
    deployment = only("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    assert deployment["spec"]["replicas"] >= 2
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= resources["limits"].keys() & resources["requests"].keys()
    (user,) = instruction("USER")
    assert str(pod["securityContext"]["runAsUser"]) == user.partition(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # The server drains for --grace seconds on SIGTERM; Kubernetes must wait longer.
    args = serve(*image_command()[2:4], *container["args"])
    assert pod["terminationGracePeriodSeconds"] > args.grace


def test_ports_probes_and_arguments_agree_with_serve_and_the_image() -> None:
    deployment = only("Deployment")
    container = server_container(deployment)
    args = serve(*image_command()[2:4], *container["args"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    exposed = {int(port) for rest in instruction("EXPOSE") for port in rest.split()}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    assert set(ports.values()) == exposed
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == ports["grpc"], probe
        assert grpc_probe.get("service", "") in ("", INFERENCE_SERVICE), probe
    assert container["readinessProbe"]["grpc"]["service"] == INFERENCE_SERVICE
    service = only("Service")
    assert service["spec"]["clusterIP"] == "None", "headless, for client-side round-robin"
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == ports["grpc"] and service_port["targetPort"] == "grpc"


def test_model_repository_is_a_shared_read_only_volume() -> None:
    claim = only("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    deployment = only("Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in server_container(deployment)["volumeMounts"]}
    mount = mounts[str(serve(*image_command()[2:]).repo)]
    assert mount["readOnly"] is True
    source = volumes[mount["name"]]["persistentVolumeClaim"]
    assert source == {"claimName": claim["metadata"]["name"], "readOnly": True}


def test_the_compile_cache_is_writable_under_a_read_only_root() -> None:
    """The image puts compiled models under $XDG_CACHE_HOME; with a read-only root
    filesystem that folder must be a mounted, writable volume, or --backend compile fails."""
    deployment = only("Deployment")
    container = server_container(deployment)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (cache,) = [
        entry.split("=", 1)[1]
        for rest in instruction("ENV")
        for entry in rest.split()
        if entry.startswith("XDG_CACHE_HOME=")
    ]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert cache in mounts and not mounts[cache].get("readOnly", False)


def test_tokens_come_from_the_secret_under_the_names_serve_reads() -> None:
    container = server_container(only("Deployment"))
    secrets = {s["metadata"]["name"]: s for s in manifests()["Secret"]}
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert set(env) == {serve_cli.TOKEN_VARIABLE, serve_cli.ADMIN_TOKEN_VARIABLE}
    for reference in env.values():
        assert reference["key"] in secrets[reference["name"]]["stringData"]


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_tls_overlay_serves_tls_and_probes_through_the_health_script(mutual: bool) -> None:
    deployment = tls_deployment(mutual)
    container = server_container(deployment)
    args = serve(*image_command()[2:4], *container["args"])
    assert args.tls_cert and args.tls_key and bool(args.tls_client_ca) == mutual
    env = {e["name"]: e.get("value") for e in container["env"]}
    files = [args.tls_cert, args.tls_key, Path(env["CROSSFIELD_HEALTH_CA"])]
    if mutual:
        files += [args.tls_client_ca, Path(env["CROSSFIELD_HEALTH_CERT"])]
        files.append(Path(env["CROSSFIELD_HEALTH_KEY"]))
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    secrets = {s["metadata"]["name"]: s for s in manifests()["Secret"]}
    tls_secret = secrets[volumes["tls"]["secret"]["secretName"]]["stringData"]
    for path in files:
        assert path.parent == Path(mounts["tls"]["mountPath"]), path
        assert path.name in tls_secret, f"{path.name} is not a key of the TLS secret"
    service = only("Service")
    namespace = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["namespace"]
    dialled = f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    assert env["CROSSFIELD_HEALTH_SERVER_NAME"] == dialled
    (healthcheck,) = instruction("HEALTHCHECK")
    script = exec_form(healthcheck.partition("CMD")[2].strip())[:2]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in container[probe], f"{probe}: Kubernetes' gRPC probe has no TLS"
        assert container[probe]["exec"]["command"][:2] == script, probe


# -- Prometheus -------------------------------------------------------------------------------
def test_kubernetes_scrape_config_finds_every_replica_on_its_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    (job,) = config["scrape_configs"]
    (discovery,) = job["kubernetes_sd_configs"]
    namespace = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["namespace"]
    assert discovery["role"] == "pod" and discovery["namespaces"]["names"] == [namespace]
    deployment = only("Deployment")
    metrics_port = serve(*image_command()[2:]).metrics_port
    for ip, address in (("10.1.2.3", f"10.1.2.3:{metrics_port}"), ("fd00::7", None)):
        address = address or f"[{ip}]:{metrics_port}"
        targets = [relabel(t, job["relabel_configs"]) for t in discovered_pod(deployment, ip)]
        assert targets and all(t is not None for t in targets)
        # One target per container port, all rewritten to the same one: Prometheus keeps one.
        assert {t["__address__"] for t in targets} == {address}
        (target,) = {json.dumps(t, sort_keys=True) for t in targets}
        target = json.loads(target)
        assert target["__metrics_path__"] == "/metrics"
        assert (target["namespace"], target["pod"]) == ("crossfield", "crossfield-7d9f-abcde")
    moved = copy.deepcopy(deployment)
    moved["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] = "/custom"
    (target, *_) = [relabel(t, job["relabel_configs"]) for t in discovered_pod(moved, "10.0.0.8")]
    assert target["__metrics_path__"] == "/custom"
    other = copy.deepcopy(deployment)
    other["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] = "something-else"
    assert all(
        relabel(t, job["relabel_configs"]) is None for t in discovered_pod(other, "10.0.0.9")
    )
    silent = copy.deepcopy(deployment)
    silent["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] = "false"
    assert all(
        relabel(t, job["relabel_configs"]) is None for t in discovered_pod(silent, "10.0.0.9")
    )


def test_static_scrape_config_uses_the_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-static.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "crossfield", "the alert rules select job=crossfield"
    (group,) = job["static_configs"]
    assert len(group["targets"]) >= 2
    assert {t.rpartition(":")[2] for t in group["targets"]} == {str(serve().metrics_port)}


def test_dashboard_and_alerts_use_only_metrics_and_labels_the_server_exposes() -> None:
    families = metric_families()
    used = set()
    for where, expression in promql_expressions():
        try:
            selectors, grouping = selectors_and_groupings(expression)
        except ValueError as err:
            pytest.fail(f"{where}: invalid PromQL {expression!r}: {err}")
        available = set(TARGET_LABELS)
        for selector in selectors:
            name = selector.name
            if name == "up":
                continue
            assert name in families, f"{where}: {name} is not a metric of crossfield.server"
            family, labels = families[name]
            used.add(family)
            available |= labels
            for matcher in selector.matchers.matchers:
                assert matcher.name in labels | TARGET_LABELS, (
                    f"{where}: {name} has no label {matcher.name}"
                )
                if matcher.name == "status":
                    values = set(matcher.value.split("|"))
                    assert values <= STATUS_NAMES, f"{where}: status {values - STATUS_NAMES}"
        assert grouping <= available, f"{where}: groups by unknown labels {grouping - available}"
    # The dashboard shows throughput, latency, batch sizes, queue depth, versions and errors.
    expected = {
        "crossfield_requests",
        "crossfield_atoms_evaluated",
        "crossfield_queue_seconds",
        "crossfield_compute_seconds",
        "crossfield_request_seconds",
        "crossfield_batch_structures",
        "crossfield_batch_atoms",
        "crossfield_queue_depth",
        "crossfield_model_loaded",
    }
    assert expected <= used, f"not shown: {expected - used}"


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "crossfield.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        text = json.dumps(panel)
        for variable in re.findall(r"\$\{?(\w+)", text):
            assert variable.startswith("__") or variable in variables, (panel["title"], variable)
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
