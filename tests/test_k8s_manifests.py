"""The Kubernetes manifests in docker/ against Kubernetes' own API schemas (kubernetes-validate,
strict: an unknown or misspelt field fails). The PyTorchJob is a Kubeflow custom resource
whose schema that package does not have: its pod templates — where the containers, volumes
and resources are — are validated as core `PodTemplate`s."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml
from support import REPO_ROOT

KUBERNETES = "1.37.0"
DOCKER = REPO_ROOT / "docker"


def test_the_daily_refresh_cronjob_is_a_valid_cronjob():
    (cronjob,) = yaml.safe_load_all((DOCKER / "k8s-cronjob.yaml").read_text())
    assert cronjob["kind"] == "CronJob"
    kubernetes_validate.validate(cronjob, KUBERNETES, strict=True)


def test_every_pod_template_of_the_multi_node_pytorchjob_is_valid():
    (job,) = yaml.safe_load_all((DOCKER / "k8s-pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas
    for role, replica in replicas.items():
        template = {"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": f"ctrscale-{role.lower()}"},
                    "template": replica["template"]}  # fmt: skip
        kubernetes_validate.validate(template, KUBERNETES, strict=True)


def test_a_misspelt_field_fails_validation():
    broken = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
              "template": {"spec": {"containers": [{"name": "a", "imagee": "x"}]}}}  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError, match="imagee"):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)
