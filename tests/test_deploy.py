"""The Kubernetes manifests under deploy/kubernetes: valid against the API schemas (what `kubectl apply
--dry-run=client` checks), and wired together (selectors, probes, ports, the read-only bundle, serve's options)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from genrec.server.cli import serve

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"  # the oldest release with every API used here (grpc probes GA in 1.27)


def manifests() -> dict[str, dict]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return {(doc := yaml.safe_load((DEPLOY / name).read_text()))["kind"]: doc for name in kustomization["resources"]}


@pytest.mark.parametrize("kind", ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"])
def test_manifest_is_valid_against_the_kubernetes_schema(kind):
    kubernetes_validate.validate(manifests()[kind], KUBERNETES_VERSION, strict=True)  # raises on any error


def test_schema_validation_catches_a_broken_manifest():
    broken = manifests()["Deployment"]
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc-port"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_manifests_fit_together():
    m = manifests()
    deployment, service = m["Deployment"], m["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert m["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"  # headless: clients see every pod and balance per call

    (container,) = pod["spec"]["containers"]
    args = container["args"]
    port = int(args[args.index("--port") + 1])
    assert {p["containerPort"] for p in container["ports"]} == {port, int(args[args.index("--metrics-port") + 1])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port  # the standard gRPC health service
    mounts = {v["name"]: v for v in container["volumeMounts"]}
    bundle_dir = Path(args[args.index("--bundle") + 1])
    bundles = next(v for v in mounts.values() if bundle_dir.is_relative_to(v["mountPath"]))
    assert bundles["readOnly"] is True
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == bundles["name"])
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    # Drain and grace fit in the pod's termination period, so Kubernetes never kills a draining server.
    grace, drain = (float(args[args.index(flag) + 1]) for flag in ("--grace-s", "--drain-s"))
    assert drain + grace < pod["spec"]["terminationGracePeriodSeconds"]


def test_every_serve_option_in_the_manifest_exists():
    import inspect

    args = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "serve"
    options = {"--" + name.replace("_", "-") for name in inspect.signature(serve).parameters}
    assert {a for a in args if a.startswith("--")} <= options
