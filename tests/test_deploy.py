"""deploy/: the Dockerfiles, the KubeRay manifests and their overlays, checked strictly against the
KubeRay CRDs, the Kubernetes schemas and the code; every check is shown to fail on a broken copy."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from rlhf_cluster.actors.group import free_port

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("deploy_validate", ROOT / "deploy" / "validate.py")
V = sys.modules["deploy_validate"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(V)
DeployError = V.DeployError


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict]]:
    return {name: V.render(kdir) for name, kdir in V.OVERLAYS.items()}


def get(objs: list[dict], kind: str, name: str) -> dict:
    """A deep copy (tests break it) of the one object of that kind and name."""
    return copy.deepcopy(next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name))


def workers(obj: dict) -> list[dict]:
    return V.cluster_spec(obj)["workerGroupSpecs"]


# --------------------------------------------------------------------------- rendering
def test_overlays_render_the_expected_objects(overlays):
    for objs in overlays.values():
        kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
        assert {("RayJob", "rlhf-ppo"), ("RayJob", "rlhf-offline"), ("RayService", "rlhf-serve"),
                ("StatefulSet", "rlhf-redis"), ("Service", "rlhf-redis"),
                ("PersistentVolumeClaim", "rlhf-checkpoints")} <= kinds
        assert not any(o["kind"] == "Secret" for o in objs)
    cpu, gpu = (get(overlays[n], "RayJob", "rlhf-ppo") for n in ("cpu-dev", "gpu"))
    assert get(overlays["cpu-dev"], "PersistentVolumeClaim", "rlhf-checkpoints")["spec"]["accessModes"] == [
        "ReadWriteOnce"]
    assert "--config tiny-cpu " in cpu["spec"]["entrypoint"]
    assert "--config llama-8b-gpu " in gpu["spec"]["entrypoint"]
    assert [g["groupName"] for g in workers(gpu)] == ["policy", "rollout", "scoring"]
    assert all(V.pod_resources(g)[1] > 0 for g in workers(gpu))
    assert sum(V.pod_resources(g)[1] * g["replicas"] for g in workers(gpu)) == 8
    head_env = V.ray_container(gpu["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])["env"]
    assert {"name": "DS_ACCELERATOR", "value": "cuda"} in head_env  # the PPO driver hands it to the actors


def test_render_implements_only_what_it_supports(tmp_path):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                                                       "metadata": {"name": "c"}, "data": {"a": "1"}}))
    k = {"resources": ["job.yaml"], "images": [{"name": "x", "newTag": "y"}]}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(k))
    with pytest.raises(DeployError, match="unsupported kustomization fields.*images"):
        V.render(tmp_path)
    k = {"resources": ["job.yaml"], "patches": [{"target": {"kind": "ConfigMap", "name": "c"},
                                                 "patch": "- {op: test, path: /data/a, value: '2'}"}]}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(k))
    with pytest.raises(DeployError, match="does not apply"):
        V.render(tmp_path)
    k["patches"][0]["target"]["name"] = "other"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(k))
    with pytest.raises(DeployError, match="matches no resource"):
        V.render(tmp_path)


# --------------------------------------------------------------------------- everything passes
@pytest.mark.parametrize("overlay", sorted(V.OVERLAYS))
def test_every_rendered_object_passes_every_check(overlays, overlay):
    objs = overlays[overlay]
    V.check_references(objs)
    for obj in objs:
        V.check_object(copy.deepcopy(obj))


def test_validate_cli_reports_no_problem():
    assert V.check_all() == []


# --------------------------------------------------------------------------- strict schemas
def test_strict_crd_schema_rejects_unknown_fields(overlays):
    job = get(overlays["cpu-dev"], "RayJob", "rlhf-ppo")
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["foo"] = 1
    crd = yaml.safe_load((V.CRD_DIR / "ray.io_rayjobs.yaml").read_text())
    published = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    jsonschema.validate(job, published)  # the published schema lets the misspelling through ...
    with pytest.raises(DeployError, match=r"spec\.rayClusterSpec\.headGroupSpec.*'foo' was unexpected"):
        V.validate_ray(job)  # ... the strict copy does not


@pytest.mark.parametrize("breakage, message", [
    (lambda o: o["spec"].update(shutdownAfterJobFinishes="yes"), "'yes' is not of type 'boolean'"),
    (lambda o: o["spec"].update(entrypointt="x"), "'entrypointt' was unexpected"),
    (lambda o: V.ray_container(workers(o)[0]["template"]).update(imagee="x"), "'imagee' was unexpected"),
    (lambda o: workers(o)[0].pop("groupName"), "'groupName' is a required property"),
    (lambda o: o.update(apiVersion="ray.io/v1alpha1"), "apiVersion must be ray.io/v1"),
])
def test_ray_objects_are_validated_strictly(overlays, breakage, message):
    job = get(overlays["cpu-dev"], "RayJob", "rlhf-ppo")
    breakage(job)
    with pytest.raises(DeployError, match=message):
        V.validate(job)


def test_core_objects_are_validated_strictly_offline(overlays):
    sts = get(overlays["cpu-dev"], "StatefulSet", "rlhf-redis")
    V.validate(sts)
    sts["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(DeployError, match="'volumeMount' was unexpected"):
        V.validate(sts)
    svc = get(overlays["cpu-dev"], "Service", "rlhf-redis")
    svc["spec"]["ports"][0]["port"] = "six"
    with pytest.raises(DeployError, match="ports.0.port"):
        V.validate(svc)


def test_secrets_are_an_example_only():
    for kfile in (ROOT / "deploy").rglob("kustomization.yaml"):
        assert not [r for r in yaml.safe_load(kfile.read_text())["resources"] if "secret" in r], kfile
    for secret in V.load_docs(V.SECRET_EXAMPLE):
        V.validate_core(secret)
        assert all(V.PLACEHOLDER in value for value in secret["stringData"].values()), secret["metadata"]["name"]


def test_the_example_tokens_are_one_per_role_and_refused_until_filled_in(tmp_path):
    """secret.example.yaml's tokens file: one named token per role with its scopes, each the placeholder, which the
    apps (and `validate.py --tokens`) refuse; a filled-in copy passes and is described without its tokens."""
    example = V.example_tokens()
    assert {name: spec["scopes"] for name, spec in example.items()} == {
        "app": ["generate"], "trainer": ["score"], "annotator": ["feedback"], "reader": ["read"],
        "ops": ["promote", "read"], "admin": ["admin"]}
    V.check_example_tokens()
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(example))
    with pytest.raises(DeployError, match="admin.token is still the example.s CHANGE-ME"):
        V.check_tokens_file(path)
    filled = {name: {**spec, "token": f"{name}-{'x' * 30}"} for name, spec in example.items()}
    path.write_text(yaml.safe_dump(filled))
    described = V.check_tokens_file(path)
    assert described.startswith("admin [admin]; annotator [feedback]; app [generate]; ops [promote, read]")
    assert "x" * 30 not in described
    filled["trainer"]["scopes"] = ["scoring"]
    path.write_text(yaml.safe_dump(filled))
    with pytest.raises(DeployError, match="trainer.scopes: unknown scope 'scoring'"):
        V.check_tokens_file(path)
    cli = subprocess.run([sys.executable, str(ROOT / "deploy" / "validate.py"), "--tokens", str(path)],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "unknown scope 'scoring'" in cli.stderr


# --------------------------------------------------------------------------- entrypoints vs the code
def test_entrypoints_validate_against_the_job_configs(overlays):
    from rlhf_cluster.lib.config import PPOConfig, RewardConfig, SFTConfig

    ppo = V.check_rayjob(get(overlays["gpu"], "RayJob", "rlhf-ppo"))
    assert [c.module for c in ppo] == ["rlhf_cluster.ppo"] and isinstance(ppo[0].config, PPOConfig)
    assert ppo[0].config.output_dir == "/mnt/checkpoints/ppo-llama-8b" and ppo[0].flags == ["--resume"]
    offline = V.check_rayjob(get(overlays["cpu-dev"], "RayJob", "rlhf-offline"))
    assert [type(c.config) for c in offline] == [SFTConfig, RewardConfig]
    assert offline[1].config.model.path == offline[0].config.output_dir + "/model"  # RM starts from the SFT model


@pytest.mark.parametrize("old, new, message", [
    ("python -m rlhf_cluster.ppo", "python -m rlhf_cluster.ppo2", "module rlhf_cluster.ppo2 does not exist"),
    ("python -m rlhf_cluster.ppo", "python -m rlhf_cluster.evaluate", "not a known job module"),
    ("--resume", "--resume rollout.temprature=0.5", r"rollout\.temprature: unknown key"),
    ("--resume", "--resume trainer.zero_stage=5", r"trainer\.zero_stage"),
    ("--resume", "--resume estimator=grpo rollout.samples_per_prompt=1", "needs rollout.samples_per_prompt >= 2"),
    ("--config tiny-cpu", "--config tiny-gpu", "must name a preset shipped in the package"),
    ("--config tiny-cpu", "--config /app/configs/tiny-cpu.yaml", "must name a preset shipped in the package"),
    ("--resume", "--resum", "has no option --resum"),
    ("--resume", "--resume ; rm -rf /", "unsupported shell syntax"),
    ("output_dir=/mnt/checkpoints/ppo-tiny", "output_dir=runs/ppo", "output_dir 'runs/ppo' is relative"),
    ("output_dir=/mnt/checkpoints/ppo-tiny", "output_dir=/tmp/ppo", "output_dir /tmp/ppo is not on a Persistent"),
    ("policy.path=/mnt/checkpoints/", "policy.path=/models/", "policy.path=/models/sft-tiny/model is not mounted"),
    ("--resume", "--resume trainer.num_cpus_per_rank=3", "trainer asks for 6 CPUs but the cluster has 4"),
])
def test_broken_entrypoints_fail_naming_the_problem(overlays, old, new, message):
    job = get(overlays["cpu-dev"], "RayJob", "rlhf-ppo")
    assert old in job["spec"]["entrypoint"]
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(old, new, 1)
    with pytest.raises(DeployError, match=message):
        V.check_rayjob(job)


def test_offline_entrypoint_checks_each_stage(overlays):
    job = get(overlays["cpu-dev"], "RayJob", "rlhf-offline")
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("model.path=", "model.pth=")
    with pytest.raises(DeployError, match=r"(?s)rlhf_cluster\.reward .*model\.pth: unknown key"):
        V.check_rayjob(job)


def test_gpu_worker_groups_must_hold_the_preset(overlays):
    job = get(overlays["gpu"], "RayJob", "rlhf-ppo")
    V.check_rayjob(copy.deepcopy(job))
    for group in workers(job):  # the same 8 GPUs, one per pod: the TP-2 engine needs 2 GPUs in one pod
        gpus = int(V.pod_resources(group)[1])
        for section in ("requests", "limits"):
            V.ray_container(group["template"])["resources"][section]["nvidia.com/gpu"] = "1"
        group["replicas"] = group["minReplicas"] = group["maxReplicas"] = gpus
    with pytest.raises(DeployError, match="one rollout rank/engine needs 8 CPUs and 2 GPUs"):
        V.check_rayjob(job)
    job = get(overlays["gpu"], "RayJob", "rlhf-ppo")
    workers(job).pop(0)  # no policy group
    with pytest.raises(DeployError, match="trainer asks for 32 CPUs but the cluster has 24"):
        V.check_rayjob(job)


def test_head_must_not_take_actors_and_jobs_must_clean_up(overlays):
    job = get(overlays["cpu-dev"], "RayJob", "rlhf-ppo")
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus")
    with pytest.raises(DeployError, match='num-cpus "0"'):
        V.check_rayjob(job)
    job = get(overlays["cpu-dev"], "RayJob", "rlhf-ppo")
    job["spec"]["shutdownAfterJobFinishes"] = False
    with pytest.raises(DeployError, match="shutdownAfterJobFinishes"):
        V.check_rayjob(job)


def test_output_dir_volume_must_be_mounted_in_every_pod(overlays):
    job = get(overlays["gpu"], "RayJob", "rlhf-ppo")
    scoring = V.ray_container(workers(job)[2]["template"])
    scoring["volumeMounts"] = [m for m in scoring["volumeMounts"] if m["mountPath"] != "/mnt/checkpoints"]
    with pytest.raises(DeployError, match="not on a PersistentVolumeClaim mounted in the scoring pod"):
        V.check_rayjob(job)


# --------------------------------------------------------------------------- RayService vs configs/serve.yaml
def test_serve_config_v2_is_configs_serve_yaml(overlays):
    svc = get(overlays["gpu"], "RayService", "rlhf-serve")
    cfg = V.check_rayservice(svc)
    local = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    assert cfg["http_options"].pop("host") == "0.0.0.0"
    assert local["http_options"].pop("host") == "127.0.0.1"
    assert cfg == local


@pytest.mark.parametrize("old, new, message", [
    ("rlhf_cluster.serve.reward_app:app_builder", "rlhf_cluster.serve.reward_app:build",
     "module rlhf_cluster.serve.reward_app has no attribute 'build'"),
    ("rlhf_cluster.serve.checkpoints_app:app_builder", "rlhf_cluster.serve.checkpoint_app:app_builder",
     "No module named 'rlhf_cluster.serve.checkpoint_app'"),
    ("max_batch_size: 16", "max_batch_size: 32", r"applications\.0\.args\.max_batch_size: 32 in serveConfigV2"),
    ("host: 0.0.0.0", "host: 127.0.0.1", r"http_options\.host"),
    ("port: 8000", "port: 8100", r"http_options\.port"),
])
def test_broken_serve_config_fails_naming_the_problem(overlays, old, new, message):
    svc = get(overlays["cpu-dev"], "RayService", "rlhf-serve")
    assert old in svc["spec"]["serveConfigV2"]
    svc["spec"]["serveConfigV2"] = svc["spec"]["serveConfigV2"].replace(old, new, 1)
    with pytest.raises(DeployError, match=message):
        V.check_rayservice(svc)


def test_rayservice_has_the_policy_and_feedback_apps_and_room_for_them(overlays):
    """The service loop's apps are in serveConfigV2 (checked equal to configs/serve.yaml above), and the worker pods
    hold every application's replicas: one fewer worker CPU fails naming the applications' demand."""
    svc = get(overlays["cpu-dev"], "RayService", "rlhf-serve")
    cfg = V.check_rayservice(svc)
    assert {a["name"]: a["route_prefix"] for a in cfg["applications"]} == {
        "reward": "/", "checkpoints": "/v1/checkpoints", "policy": "/policy", "feedback": "/v1/feedback"}
    pod = workers(svc)[0]["template"]["spec"]["containers"][0]["resources"]
    pod["requests"]["cpu"] = pod["limits"]["cpu"] = "2"
    with pytest.raises(DeployError, match=r"ask for 2\.2 CPUs .*more than the worker pods' 2"):
        V.check_rayservice(svc)


def test_rayservice_needs_redis_fault_tolerance_from_a_secret(overlays):
    svc = get(overlays["cpu-dev"], "RayService", "rlhf-serve")
    svc["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisPassword"] = {"value": "hunter2"}
    with pytest.raises(DeployError, match="redisPassword from a Secret"):
        V.check_rayservice(svc)


def test_serve_pods_read_named_tokens_from_a_read_only_secret_file(overlays):
    """Every pod of the RayService has $RLHF_SERVE_TOKENS_FILE on a read-only mount of the tokens' Secret that only
    its owner may read; the shipped manifest has no shared token at all."""
    svc = get(overlays["cpu-dev"], "RayService", "rlhf-serve")
    cfg = V.check_rayservice(copy.deepcopy(svc))
    for where, pod in V.pod_templates(svc):
        env = {e["name"]: e for e in V.ray_container(pod)["env"]}
        assert env["RLHF_SERVE_TOKENS_FILE"]["value"] == "/etc/rlhf/tokens.yaml", where
        assert "RLHF_SERVE_TOKEN" not in env and "RLHF_SERVE_TOKEN_SCOPES" not in env, where
        assert V.mounts(pod)["/etc/rlhf"]["secret"]["defaultMode"] == 0o400, where
    assert all("token_scopes" not in (a.get("args") or {}) for a in cfg["applications"])

    def broken(change):
        obj = copy.deepcopy(svc)
        change(V.pod_templates(obj)[1][1])  # the serve worker group's pod
        return obj

    def env_of(pod):
        return V.ray_container(pod)["env"]

    def mount_of(pod):
        return next(m for m in V.ray_container(pod)["volumeMounts"] if m["name"] == "serve-tokens")

    def volume_of(pod):
        return next(v for v in pod["spec"]["volumes"] if v["name"] == "serve-tokens")

    for change, message in [
        (lambda pod: env_of(pod).pop(), "serve pod: no RLHF_SERVE_TOKENS_FILE"),
        (lambda pod: env_of(pod)[-1].update(value="/etc/tokens.yaml"), "/etc/tokens.yaml is not on a Secret volume"),
        (lambda pod: mount_of(pod).pop("readOnly"), "readOnly: true"),
        (lambda pod: volume_of(pod)["secret"].update(defaultMode=0o644), "mode is 0644: only its owner"),
        (lambda pod: volume_of(pod)["secret"]["items"][0].update(path="t.yaml"), "no item at tokens.yaml"),
        (lambda pod: env_of(pod).append({"name": "RLHF_SERVE_TOKEN_SCOPES", "value": "generate,admin"}),
         "RLHF_SERVE_TOKEN_SCOPES gives the shared token admin"),
        (lambda pod: env_of(pod).append({"name": "RLHF_SERVE_TOKEN_SCOPES", "value": "generate,scroe"}),
         r"RLHF_SERVE_TOKEN_SCOPES: unknown scope 'scroe'"),
    ]:
        with pytest.raises(DeployError, match=message):
            V.check_rayservice(broken(change))
    obj = copy.deepcopy(svc)
    obj["spec"]["serveConfigV2"] = obj["spec"]["serveConfigV2"].replace(
        "      require_token: true        # generation", "      token_scopes: [admin]\n      require_token: true  # x")
    with pytest.raises(DeployError, match="application policy: token_scopes gives the shared token admin"):
        V.check_rayservice(obj)


def test_sync_serve_config_regenerates_the_block(tmp_path):
    sync = importlib.util.spec_from_file_location("sync_serve", ROOT / "deploy" / "sync_serve_config.py")
    mod = importlib.util.module_from_spec(sync)
    sync.loader.exec_module(mod)
    rayservice, serve_yaml = tmp_path / "rayservice.yaml", tmp_path / "serve.yaml"
    shutil.copy(mod.RAYSERVICE, rayservice)
    shutil.copy(mod.SERVE_CONFIG, serve_yaml)
    assert not mod.sync(rayservice, serve_yaml)  # the committed manifest is in sync
    serve_yaml.write_text(serve_yaml.read_text().replace("max_batch_size: 16", "max_batch_size: 24"))
    assert mod.sync(rayservice, serve_yaml)
    svc = yaml.safe_load(rayservice.read_text())
    assert yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]["max_batch_size"] == 24
    assert svc["spec"]["rayClusterConfig"] == yaml.safe_load(mod.RAYSERVICE.read_text())["spec"]["rayClusterConfig"]


# --------------------------------------------------------------------------- env vars, ports, references
def test_env_vars_must_be_read_by_the_code(overlays):
    job = get(overlays["cpu-dev"], "RayJob", "rlhf-ppo")
    V.check_env(job)
    V.ray_container(workers(job)[0]["template"])["env"].append({"name": "RLHF_CACHE", "value": "/x"})
    with pytest.raises(DeployError, match="env var RLHF_CACHE .cpu pod. is read nowhere"):
        V.check_env(job)
    job = get(overlays["cpu-dev"], "RayJob", "rlhf-ppo")
    job["spec"]["runtimeEnvYAML"] = "env_vars: {RLHF_CLUSTER_CACHE: /mnt/checkpoints, VLLM_KV_CACHE: '1'}"
    with pytest.raises(DeployError, match="VLLM_KV_CACHE .runtimeEnvYAML."):
        V.check_env(job)
    sts = get(overlays["cpu-dev"], "StatefulSet", "rlhf-redis")
    sts["spec"]["template"]["spec"]["containers"][0]["env"][0]["name"] = "REDIS_PASS"
    with pytest.raises(DeployError, match="REDIS_PASS is not used by container redis"):
        V.check_env(sts)


def test_ports_must_match_ray_and_serve(overlays):
    svc = get(overlays["cpu-dev"], "RayService", "rlhf-serve")
    V.check_ports(svc)
    svc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["dashboard-port"] = "8266"
    with pytest.raises(DeployError, match="port 'dashboard' is 8265, but Ray listens on 8266"):
        V.check_ports(svc)
    svc = get(overlays["cpu-dev"], "RayService", "rlhf-serve")
    V.ray_container(workers(svc)[0]["template"])["ports"][0]["containerPort"] = 8080
    with pytest.raises(DeployError, match="serve pod's 'serve' port is 8080, but Serve listens on 8000"):
        V.check_ports(svc)


def test_references_must_resolve(overlays):
    objs = copy.deepcopy(overlays["cpu-dev"])
    svc = get(objs, "RayService", "rlhf-serve")
    env = V.ray_container(svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])["env"]
    next(e for e in env if e["name"] == "REDIS_URL")["valueFrom"]["secretKeyRef"]["key"] = "bearer"
    with pytest.raises(DeployError, match="Secret 'rlhf-redis' key 'bearer' is referenced but not in"):
        V.check_references([o for o in objs if o["kind"] != "RayService"] + [svc])
    svc = get(objs, "RayService", "rlhf-serve")
    volume = next(v for v in V.cluster_spec(svc)["headGroupSpec"]["template"]["spec"]["volumes"] if "secret" in v)
    volume["secret"]["secretName"] = "rlhf-serve-tokenz"
    with pytest.raises(DeployError, match="Secret 'rlhf-serve-tokenz' key 'tokens.yaml' is referenced but not in"):
        V.check_references([o for o in objs if o["kind"] != "RayService"] + [svc])
    objs = [o for o in copy.deepcopy(overlays["gpu"]) if o["kind"] != "PersistentVolumeClaim" or
            o["metadata"]["name"] != "rlhf-inputs"]
    with pytest.raises(DeployError, match="mounts PVC 'rlhf-inputs', which is not defined"):
        V.check_references(objs)
    objs = [o for o in copy.deepcopy(overlays["cpu-dev"]) if o["kind"] != "Service"]
    with pytest.raises(DeployError, match="redisAddress rlhf-redis:6379 is not a Service port"):
        V.check_references(objs)
    objs = copy.deepcopy(overlays["cpu-dev"]) + V.load_docs(V.SECRET_EXAMPLE)
    with pytest.raises(DeployError, match="a Secret is part of the rendered manifests"):
        V.check_references(objs)


def test_redis_persists_with_aof_on_a_claim(overlays):
    sts = get(overlays["cpu-dev"], "StatefulSet", "rlhf-redis")
    V.check_redis(sts)
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    args[0] = args[0].replace("--appendonly yes", "--appendonly no")
    with pytest.raises(DeployError, match="--appendonly yes"):
        V.check_redis(sts)
    args[0] = args[0].replace("--appendonly no", "--appendonly yes").replace("always", "everysec")
    with pytest.raises(DeployError, match="--appendfsync always"):
        V.check_redis(sts)


# --------------------------------------------------------------------------- Dockerfiles
def test_dockerfiles_install_existing_extras_and_files():
    assert V.makefile_uninstalls() == ["torchvision", "torchaudio", "torchcodec"]
    V.check_dockerfile(ROOT / "deploy" / "Dockerfile", "gpu")
    V.check_dockerfile(ROOT / "deploy" / "Dockerfile.cpu", "cpu", V.makefile_uninstalls())
    assert (ROOT / "deploy" / "Dockerfile").read_text().startswith("# GPU image")
    assert "FROM nvidia/cuda:" in (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in (ROOT / "deploy" / "Dockerfile.cpu").read_text()


@pytest.mark.parametrize("old, new, message", [
    ('whl)[cpu]"', 'whl)[cpu-only]"', "extra 'cpu-only' is not in pyproject.toml"),
    ('"$(ls /tmp/dist/rlhf_cluster-*.whl)[cpu]"', "-e '.[cpu]'", "an editable install"),
    ("rm -rf /tmp/dist /app/rlhf_cluster", "rm -rf /tmp/dist", "the sources must be removed"),
    ("COPY rlhf_cluster ./rlhf_cluster", "COPY rlhf_clusters ./rlhf_cluster", "COPY rlhf_clusters: no such file"),
    ("USER 1000", "USER root", "non-root USER"),
    ("WORKDIR /app", "WORKDIR /srv", "WORKDIR must be /app"),
    ("torchaudio torchcodec", "torchaudio", "must `pip uninstall -y torchvision torchaudio torchcodec`"),
    ("ARG TORCH_INDEX_URL", "ARG HF_TOKEN=abc\nARG TORCH_INDEX_URL", "ARG HF_TOKEN=abc looks like a secret"),
])
def test_broken_dockerfile_fails_naming_the_problem(tmp_path, old, new, message):
    src = ROOT / "deploy" / "Dockerfile.cpu"
    assert old in src.read_text()
    (tmp_path / src.name).write_text(src.read_text().replace(old, new, 1))
    shutil.copy(src.with_name(src.name + ".dockerignore"), tmp_path)
    with pytest.raises(DeployError, match=message):
        V.check_dockerfile(tmp_path / src.name, "cpu", V.makefile_uninstalls())


# --------------------------------------------------------------------------- the PPO RayJob on a real Ray cluster
@contextlib.contextmanager
def ray_head(num_cpus: int = 4):
    """`ray start --head --block` in its own process group and temp dir; yields the dashboard URL.

    Only this group is stopped at the end, never other Ray clusters on the machine.
    """
    ray = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's socket paths must stay under 107 chars
    ports = {f"--{p}": free_port() for p in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                             "object-manager-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "metrics-export-port",
                                             "runtime-env-agent-port")}
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(Path(temp) / "ray-start.log", "w")
    proc = subprocess.Popen([ray, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--disable-usage-stats",
                             "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
                             *[f"{k}={v}" for k, v in ports.items()]],
                            env=env, stdin=subprocess.PIPE,  # Ray's reaper stops the group when stdin closes
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        for _ in range(90):
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(Path(temp) / 'ray-start.log').read_text()[-3000:]}")
            if subprocess.run([ray, "job", "list", "--address", url], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(2)
        else:
            raise RuntimeError("the Ray dashboard did not come up in 180 s")
        yield url, ray, env
    finally:
        # SIGTERM to `ray start` alone: it stops its cluster in ~4 s (the same signal to the whole
        # group left it waiting 30 s); what is left of the group is then killed
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.long
def test_ppo_rayjob_runs_unchanged_on_a_local_ray_cluster(overlays, builtin_assets, tmp_path):
    """The manifest's entrypoint and runtime env, submitted with `ray job submit` as KubeRay's submitter does.

    Two changes only: /app (the image's checkout) is this checkout, and overrides appended at the end
    (the last value of a key wins) make the run short and local: the built-in base and reward_base
    models, one iteration, and output and registry in tmp_path.
    """
    job = get(overlays["cpu-dev"], "RayJob", "rlhf-ppo")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    out = tmp_path / "ppo"
    overrides = [f"output_dir={out}", f"registry={tmp_path / 'registry'}",
                 f"policy.path={builtin_assets.base}", f"reward.path={builtin_assets.reward_base}",
                 f"builtin.cache_dir={builtin_assets.root.parent}", "iterations=1", "prompts_per_iteration=4",
                 "eval_every=1", "checkpoint_every=1", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=16"]
    entrypoint = job["spec"]["entrypoint"].replace(f"{V.APP_DIR}/", f"{ROOT}/")
    entrypoint += " " + shlex.join(overrides)
    volume = Path("/mnt/checkpoints")  # the runtime env's RLHF_CLUSTER_CACHE; the overrides keep the run off it
    volume_existed = volume.exists()
    with ray_head() as (url, ray, env):
        sid = f"rlhf-ppo-{os.getpid()}"
        # `ray job submit` without --no-wait follows the job to its end (as KubeRay's submitter follows it with
        # `ray job logs --follow`): one client process, where polling `ray job status` every few seconds
        # started a CLI (and imported Ray) each time, taking a core from the job on a small machine
        submit = subprocess.run([ray, "job", "submit", "--address", url, "--submission-id", sid,
                                 "--runtime-env-json", json.dumps(runtime_env), "--", *shlex.split(entrypoint)],
                                env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
        logs = submit.stdout
        status = subprocess.run([ray, "job", "status", "--address", url, sid], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout
        assert f"Job '{sid}' succeeded" in status, f"{status[-3000:]}\n{logs[-5000:]}"
    assert (out / "checkpoints" / "iter_000001" / "manifest.json").is_file()
    assert (out / "metrics.jsonl").read_text().strip()
    assert (out / "report.png").stat().st_size > 0
    assert volume_existed or not volume.exists()


def test_deploying_an_application_the_config_lacks_fails_before_serve_starts():
    from rlhf_cluster.serve.launch import deploy, load_serve_config

    with pytest.raises(ValueError, match=r"no application named \['polcy'\].*'policy', 'feedback'"):
        deploy(load_serve_config(), only=["reward", "polcy"])
