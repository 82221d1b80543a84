"""platform/k8s: KubeRay manifests valid against the KubeRay v1.7.0 CRDs, token auth on, naming only what exists."""

import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = {"rayjob-pretrain.yaml": "ray.io_rayjobs.yaml", "rayservice.yaml": "ray.io_rayservices.yaml"}


def crd_schema(crd_file: str, version: str) -> dict:
    crd = yaml.safe_load((CRDS / crd_file).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


@pytest.mark.skipif(not CRDS.is_dir(), reason="the KubeRay CRDs live in ../shared/kuberay-crds")
@pytest.mark.parametrize("manifest, crd", MANIFESTS.items())
def test_manifest_validates_against_the_kuberay_crd(manifest, crd):
    document = yaml.safe_load((ROOT / "platform" / "k8s" / manifest).read_text())
    version = document["apiVersion"].split("/")[1]
    jsonschema.validate(document, crd_schema(crd, version))
    cluster = document["spec"].get("rayClusterSpec") or document["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    for container in [c for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
                      for c in group["template"]["spec"]["containers"]]:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAYLOOP_STORAGE"].startswith("s3://"), container["name"]  # runs on the bucket


def test_a_broken_manifest_fails_the_schema():
    document = yaml.safe_load((ROOT / "platform" / "k8s" / "rayjob-pretrain.yaml").read_text())
    document["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, crd_schema("ray.io_rayjobs.yaml", "v1"))


def test_every_entrypoint_config_and_import_path_exists(tmp_path, monkeypatch):
    from serve.config import ServeAppConfig

    job = yaml.safe_load((ROOT / "platform" / "k8s" / "rayjob-pretrain.yaml").read_text())
    module = re.search(r"python -m ([\w.]+)", job["spec"]["entrypoint"]).group(1)
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    for config in re.findall(r"--config (\S+)", job["spec"]["entrypoint"]):
        assert (ROOT / config).is_file(), config
    service = yaml.safe_load((ROOT / "platform" / "k8s" / "rayservice.yaml").read_text())
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))  # what Serve itself accepts
    for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
        module, _, attribute = app["import_path"].partition(":")
        assert hasattr(__import__(module, fromlist=[attribute]), attribute), app["import_path"]
        # The args are the app's typed config; the bucket's model stands in as a local folder here.
        (tmp_path / "config.json").write_text("{}")
        (tmp_path / "key").write_text("k")
        args = {**app["args"], "auth": {**app["args"]["auth"], "api_key_file": str(tmp_path / "key")},
                "models": [{**m, "path": str(tmp_path)} for m in app["args"]["models"]]}
        ServeAppConfig.model_validate(args)
