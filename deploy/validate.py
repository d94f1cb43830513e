"""Render the kustomizations under deploy/ and check them against the schemas and against the code.

    python deploy/validate.py              # both overlays and the Dockerfiles; exit 1 on any problem
    python deploy/validate.py --tokens F   # a filled-in tokens file, before it goes into the rlhf-serve-tokens Secret

Kustomize is not needed: `render` implements the subset the kustomizations use (`resources` and
JSON 6902 `patches`) and rejects anything else. Each `check_*` function takes one manifest (a dict,
as rendered) and raises DeployError naming the problem, so tests can feed it a broken copy.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import re
import shlex
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import jsonpatch
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CRD_DIR = DEPLOY / "crds"
OVERLAYS = {"cpu-dev": DEPLOY / "overlays" / "cpu-dev", "gpu": DEPLOY / "overlays" / "gpu"}
SECRET_EXAMPLE = DEPLOY / "base" / "secret.example.yaml"
SERVE_CONFIG = ROOT / "configs" / "serve.yaml"
APP_DIR = "/app"  # where the Dockerfiles put the checkout (WORKDIR)
CODE_DIRS = ("rlhf_cluster", "actors", "serve")
K8S_VERSION = "1.33.0"  # Kubernetes API version the core objects are validated against
RAY_KINDS = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}
# Job module -> its config class in rlhf_cluster.lib.config, and the flags its CLI takes besides --config.
JOB_CONFIGS = {"rlhf_cluster.ppo": "PPOConfig", "rlhf_cluster.sft": "SFTConfig",
               "rlhf_cluster.reward": "RewardConfig", "rlhf_cluster.dpo": "DPOConfig"}
JOB_FLAGS = {"rlhf_cluster.ppo": {"--resume"}}
PLACEHOLDER = "CHANGE-ME"
TOKENS_SECRET, TOKENS_KEY = "rlhf-serve-tokens", "tokens.yaml"  # the Serve apps' named tokens (secret.example.yaml)


class DeployError(ValueError):
    """A manifest that does not fit the schemas or the code."""


def name_of(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# --------------------------------------------------------------------------- rendering
def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def render(kdir: Path) -> list[dict]:
    """The objects `kustomize build kdir` would produce, for the subset of kustomize used here."""
    kfile = kdir / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - {"apiVersion", "kind", "resources", "patches"}
    if unknown:
        raise DeployError(f"{kfile}: unsupported kustomization fields {sorted(unknown)}")
    objs: list[dict] = []
    for res in k.get("resources", []):
        path = (kdir / res).resolve()
        objs += render(path) if path.is_dir() else load_docs(path)
    for patch in k.get("patches", []):
        if set(patch) - {"target", "patch", "path"} or not set(patch["target"]) <= {"kind", "name"}:
            raise DeployError(f"{kfile}: only JSON 6902 patches with a kind/name target are supported: {patch}")
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (kdir / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise DeployError(f"{kfile}: patch for {patch['target']} is not a JSON 6902 list of operations")
        hits = [i for i, o in enumerate(objs)
                if all(o.get("kind") == v if f == "kind" else o["metadata"]["name"] == v
                       for f, v in patch["target"].items())]
        if not hits:
            raise DeployError(f"{kfile}: patch target {patch['target']} matches no resource")
        for i in hits:
            try:
                objs[i] = jsonpatch.apply_patch(objs[i], ops)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise DeployError(f"{kfile}: patch of {name_of(objs[i])} does not apply: {e}") from None
    seen = set()
    for o in objs:
        if (o["kind"], o["metadata"]["name"]) in seen:
            raise DeployError(f"{kfile}: {name_of(o)} is defined twice")
        seen.add((o["kind"], o["metadata"]["name"]))
    return objs


# --------------------------------------------------------------------------- schemas
def strict(schema):
    """A copy of an OpenAPI schema in which every object with `properties` rejects unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    # Under `properties` the keys are field names, not keywords: recurse into each field's schema.
    out = {k: ({f: strict(s) for f, s in v.items()} if k == "properties" else strict(v)) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((CRD_DIR / RAY_KINDS[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def _errors(validator, obj: dict, what: str) -> None:
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:10]]
        raise DeployError(f"{what} does not match its schema:\n  " + "\n  ".join(lines))


def validate_ray(obj: dict) -> None:
    """Strict validation of a RayJob/RayService/RayCluster against the vendored KubeRay CRD (v1)."""
    if obj.get("apiVersion") != "ray.io/v1":
        raise DeployError(f"{name_of(obj)}: apiVersion must be ray.io/v1, not {obj.get('apiVersion')!r}")
    _errors(crd_validator(obj["kind"]), obj, name_of(obj))
    spec = cluster_spec(obj)
    if obj["kind"] != "RayCluster":  # the embedded cluster spec must also be a valid RayCluster spec
        cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": obj["metadata"], "spec": spec}
        _errors(crd_validator("RayCluster"), cluster, f"{name_of(obj)} (its RayCluster spec)")


def validate_core(obj: dict) -> None:
    """Strict validation of a core Kubernetes object with kubernetes-validate (offline schemas)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(map(str, e.absolute_path)) or "(root)"
        raise DeployError(f"{name_of(obj)}: {where}: {e.message}") from None


def validate(obj: dict) -> None:
    """Any object: Ray ones against the CRDs, the rest (and the Ray pod templates) with kubernetes-validate."""
    if obj["kind"] in RAY_KINDS:
        validate_ray(obj)
        for where, pod in pod_templates(obj):
            validate_core({"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": f"{obj['metadata']['name']}-{where}"}, "template": pod})
    else:
        validate_core(obj)


# --------------------------------------------------------------------------- Ray manifests: structure
def cluster_spec(obj: dict) -> dict:
    return {"RayJob": lambda s: s.get("rayClusterSpec", {}), "RayService": lambda s: s.get("rayClusterConfig", {}),
            "RayCluster": lambda s: s}[obj["kind"]](obj["spec"])


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(head | worker group name, pod template) of a Ray object's cluster."""
    spec = cluster_spec(obj)
    pods = [("head", spec["headGroupSpec"]["template"])]
    pods += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return pods


def ray_container(pod: dict) -> dict:
    return pod["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def mounts(pod: dict) -> dict[str, dict]:
    """mountPath -> the volume mounted there, for the Ray container."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    return {m["mountPath"]: volumes.get(m["name"], {}) for m in ray_container(pod).get("volumeMounts", [])}


def quantity(q) -> float:
    """A Kubernetes CPU/GPU quantity ("500m", "4", 2) as a number."""
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def pod_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees in one pod of a group: rayStartParams, else the container's limits."""
    params = group.get("rayStartParams", {})
    limits = ray_container(group["template"]).get("resources", {}).get("limits", {})
    cpus = quantity(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return cpus, gpus


# --------------------------------------------------------------------------- RayJob entrypoints
@dataclass
class JobCommand:
    module: str
    config_path: Path  # in this checkout
    flags: list[str]
    overrides: list[str]
    config: object  # the validated config (PPOConfig, SFTConfig, ...)


def split_commands(entrypoint: str) -> list[list[str]]:
    """`a && b` -> [[a...], [b...]]; any other shell syntax is refused."""
    commands, current = [], []
    for token in shlex.split(entrypoint):
        if token == "&&":
            commands.append(current)
            current = []
        elif token in {";", "|", "||", "&"} or token.startswith(("$", "`")):
            raise DeployError(f"entrypoint: unsupported shell syntax {token!r} (only `cmd && cmd`)")
        else:
            current.append(token)
    return commands + [current]


def parse_command(argv: list[str]) -> JobCommand:
    """Check one `python -m MODULE --config PRESET [flags] key=value...` against the code."""
    from rlhf_cluster.lib import config as C

    if argv[:2] != ["python", "-m"] or len(argv) < 3:
        raise DeployError(f"entrypoint command {shlex.join(argv)!r} is not `python -m MODULE ...`")
    module, rest = argv[2], argv[3:]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise DeployError(f"entrypoint: module {module} does not exist")
    if module not in JOB_CONFIGS:
        raise DeployError(f"entrypoint: {module} is not a known job module ({', '.join(JOB_CONFIGS)})")
    cls = getattr(C, JOB_CONFIGS[module])
    if getattr(importlib.import_module(module), cls.__name__, None) is not cls:
        raise DeployError(f"entrypoint: {module} does not use {cls.__name__}")
    config, flags, overrides = None, [], []
    while rest:
        arg = rest.pop(0)
        if arg == "--config":
            if not rest:
                raise DeployError(f"entrypoint: {module}: --config needs a file")
            config = rest.pop(0)
        elif arg.startswith("--"):
            if arg not in JOB_FLAGS.get(module, set()):
                raise DeployError(f"entrypoint: {module} has no option {arg}")
            flags.append(arg)
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise DeployError(f"entrypoint: {module}: unexpected argument {arg!r}")
    if config is None or config not in C.presets():
        raise DeployError(f"entrypoint: {module}: --config must name a preset shipped in the package (the image "
                          f"installs the wheel: {', '.join(C.presets())}), got {config!r}")
    path = C.preset_or_path(config)
    try:
        cfg = C.load_config(cls, path, overrides)
    except C.ConfigError as e:
        raise DeployError(f"entrypoint: {module} --config {config}: {e}") from None
    return JobCommand(module, path, flags, overrides, cfg)


def check_rayjob(obj: dict) -> list[JobCommand]:
    """Entrypoint commands exist and their configs validate; the cluster can hold each job and its files."""
    spec = obj["spec"]
    commands = [parse_command(argv) for argv in split_commands(spec["entrypoint"])]
    if not spec.get("shutdownAfterJobFinishes") or "ttlSecondsAfterFinished" not in spec:
        raise DeployError(f"{name_of(obj)}: set shutdownAfterJobFinishes: true and ttlSecondsAfterFinished")
    head = cluster_spec(obj)["headGroupSpec"]
    if str(head.get("rayStartParams", {}).get("num-cpus")) != "0":
        raise DeployError(f"{name_of(obj)}: the head must have rayStartParams num-cpus \"0\" (no actors on it)")
    for cmd in commands:
        check_job_fits(obj, cmd)
        check_job_paths(obj, cmd)
    return commands


def check_job_fits(obj: dict, cmd: JobCommand) -> None:
    """The worker groups hold what the job asks for, each rank/engine within one pod (config.check_resources)."""
    from rlhf_cluster.lib.config import ConfigError, check_resources

    groups = cluster_spec(obj).get("workerGroupSpecs", [])
    pods = [(g, pod_resources(g)) for g in groups]
    cpus = sum(c * g.get("replicas", g.get("minReplicas", 0)) for g, (c, _) in pods)
    gpus = sum(n * g.get("replicas", g.get("minReplicas", 0)) for g, (_, n) in pods)
    try:
        check_resources(cmd.config, cpus, gpus)
    except ConfigError as e:
        raise DeployError(f"{name_of(obj)}: {cmd.module}: {e}") from None
    for name in cmd.config.resource_groups():
        group = getattr(cmd.config, name)
        unit = ((group.num_cpus_per_rank, group.num_gpus_per_rank) if hasattr(group, "num_cpus_per_rank")
                else (group.num_cpus_per_engine, group.num_gpus_per_engine))
        if not any(c >= unit[0] and n >= unit[1] for _, (c, n) in pods):
            raise DeployError(f"{name_of(obj)}: {cmd.module}: one {name} rank/engine needs {unit[0]:g} CPUs and "
                              f"{unit[1]:g} GPUs, more than any worker pod has")


def _under(path: str, mount: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(mount))


def check_job_paths(obj: dict, cmd: JobCommand) -> None:
    """output_dir lies on a PVC mounted in every pod; every other absolute path of the config is mounted too."""
    out = cmd.config.output_dir
    if not out.startswith("/"):
        raise DeployError(f"{name_of(obj)}: {cmd.module}: output_dir {out!r} is relative: it would land in the "
                          "driver's working directory, not on the checkpoint volume")
    claims = set()
    for where, pod in pod_templates(obj):
        found = [(m, v) for m, v in mounts(pod).items() if _under(out, m)]
        if not found or "persistentVolumeClaim" not in found[-1][1]:
            raise DeployError(f"{name_of(obj)}: {cmd.module}: output_dir {out} is not on a PersistentVolumeClaim "
                              f"mounted in the {where} pod")
        claims.add(found[-1][1]["persistentVolumeClaim"]["claimName"])
    if len(claims) != 1:
        raise DeployError(f"{name_of(obj)}: output_dir {out} is on different volumes in different pods: {claims}")
    for key, path in config_paths(cmd.config.model_dump()):
        for where, pod in pod_templates(obj):
            if not _under(path, APP_DIR) and not any(_under(path, m) for m in mounts(pod)):
                raise DeployError(f"{name_of(obj)}: {cmd.module}: {key}={path} is not mounted in the {where} pod")


def config_paths(tree: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every absolute path in a config dump."""
    found = []
    for k, v in tree.items():
        if isinstance(v, dict):
            found += config_paths(v, f"{prefix}{k}.")
        elif isinstance(v, str) and v.startswith("/"):
            found.append((prefix + k, v))
    return found


# --------------------------------------------------------------------------- RayService
def expected_serve_config() -> dict:
    """configs/serve.yaml as the RayService must carry it: the one difference is the proxy's host."""
    cfg = yaml.safe_load(SERVE_CONFIG.read_text())
    cfg.setdefault("http_options", {})["host"] = "0.0.0.0"
    return cfg


def first_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}{k}: only in {'serveConfigV2' if k in a else 'configs/serve.yaml'}"
            d = first_difference(a[k], b[k], f"{path}{k}.")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{path}{i}."))), None)
    return None if a == b else f"{path.rstrip('.')}: {a!r} in serveConfigV2, {b!r} expected"


def check_rayservice(obj: dict) -> dict:
    """serveConfigV2 == configs/serve.yaml (host 0.0.0.0), loads with rlhf_cluster.serve.launch, import paths
    resolve."""
    from rlhf_cluster.serve.launch import load_serve_config

    text = obj["spec"].get("serveConfigV2", "")
    cfg = yaml.safe_load(text)
    for app in cfg["applications"]:
        module, _, attr = app["import_path"].partition(":")
        try:
            target = importlib.import_module(module)
        except ImportError as e:
            raise DeployError(f"{name_of(obj)}: application {app['name']}: import_path {app['import_path']}: {e}") \
                from None
        if not hasattr(target, attr):
            raise DeployError(f"{name_of(obj)}: application {app['name']}: import_path {app['import_path']}: "
                              f"module {module} has no attribute {attr!r}")
    check_serve_tokens(obj, cfg)
    diff = first_difference(cfg, expected_serve_config())
    if diff:
        raise DeployError(f"{name_of(obj)}: serveConfigV2 differs from configs/serve.yaml at {diff} "
                          "(regenerate it: python deploy/sync_serve_config.py)")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        fh.write(text)
        fh.flush()
        try:
            load_serve_config(fh.name)
        except Exception as e:
            raise DeployError(f"{name_of(obj)}: serveConfigV2 is not a valid Serve config: {e}") from None
    ft = cluster_spec(obj).get("gcsFaultToleranceOptions", {})
    if not ft.get("redisAddress") or "secretKeyRef" not in ft.get("redisPassword", {}).get("valueFrom", {}):
        raise DeployError(f"{name_of(obj)}: gcsFaultToleranceOptions needs redisAddress and a redisPassword "
                          "from a Secret (valueFrom.secretKeyRef)")
    if not obj["spec"].get("upgradeStrategy", {}).get("type"):
        raise DeployError(f"{name_of(obj)}: set spec.upgradeStrategy.type")
    check_serve_apps_fit(obj, cfg)
    return cfg


def check_serve_tokens(obj: dict, cfg: dict) -> None:
    """Every Serve pod reads its named tokens from a Secret file ($RLHF_SERVE_TOKENS_FILE, read-only, only its owner
    may read it), and no shared token is given admin, in a pod's $RLHF_SERVE_TOKEN_SCOPES or an app's token_scopes:
    a token handed to clients must not also be the operator's."""
    from rlhf_cluster.serve.common import TOKEN_SCOPES_ENV, TOKENS_FILE_ENV, parse_scopes

    def scopes(value, where: str) -> frozenset[str]:
        try:
            return parse_scopes(value, where)
        except ValueError as e:
            raise DeployError(f"{name_of(obj)}: {e}") from None

    for where, pod in pod_templates(obj):
        env = {e["name"]: e for e in ray_container(pod).get("env", [])}
        path = env.get(TOKENS_FILE_ENV, {}).get("value")
        if not path:
            raise DeployError(f"{name_of(obj)}: {where} pod: no {TOKENS_FILE_ENV}: the Serve apps need their named "
                              f"tokens from the Secret {TOKENS_SECRET} (deploy/README.md)")
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        found = [(m, volumes.get(m["name"], {})) for m in ray_container(pod).get("volumeMounts", [])
                 if _under(path, m["mountPath"])]
        if not found or "secret" not in found[-1][1]:
            raise DeployError(f"{name_of(obj)}: {where} pod: {TOKENS_FILE_ENV}={path} is not on a Secret volume")
        mount, secret = found[-1][0], found[-1][1]["secret"]
        if not mount.get("readOnly"):
            raise DeployError(f"{name_of(obj)}: {where} pod: mount the tokens' Secret with readOnly: true")
        rel = mount.get("subPath") or PurePosixPath(path).relative_to(mount["mountPath"]).as_posix()
        items = {i["path"]: i for i in secret.get("items", [])}
        if items and rel not in items:
            raise DeployError(f"{name_of(obj)}: {where} pod: the tokens' Secret volume has no item at {rel}")
        mode = items.get(rel, {}).get("mode", secret.get("defaultMode", 0o644))
        if mode & 0o077:
            raise DeployError(f"{name_of(obj)}: {where} pod: the tokens file's mode is {mode:04o}: only its owner may "
                              "read it (defaultMode: 0400)")
        if TOKEN_SCOPES_ENV in env:
            value = env[TOKEN_SCOPES_ENV].get("value")
            if value is None:
                raise DeployError(f"{name_of(obj)}: {where} pod: give {TOKEN_SCOPES_ENV} as a value, so it is checked")
            if "admin" in scopes(value, f"{where} pod: ${TOKEN_SCOPES_ENV}"):
                raise DeployError(f"{name_of(obj)}: {where} pod: {TOKEN_SCOPES_ENV} gives the shared token admin; "
                                  "operators get a named token in the tokens file")
    for app in cfg["applications"]:
        given = (app.get("args") or {}).get("token_scopes")
        if given is not None and "admin" in scopes(given, f"application {app['name']}: token_scopes"):
            raise DeployError(f"{name_of(obj)}: application {app['name']}: token_scopes gives the shared token admin; "
                              "operators get a named token in the tokens file")


def check_serve_apps_fit(obj: dict, cfg: dict) -> None:
    """The applications' replicas (num_replicas x num_cpus in their args) fit the worker pods at minReplicas."""
    pods = [(g, pod_resources(g)) for g in cluster_spec(obj).get("workerGroupSpecs", [])]
    cpus = sum(c * g.get("minReplicas", g.get("replicas", 0)) for g, (c, _) in pods)
    need = {a["name"]: float((a.get("args") or {}).get("num_cpus", 1)) * int((a.get("args") or {}).get(
        "num_replicas", 1)) for a in cfg["applications"]}
    if sum(need.values()) > cpus + 1e-9:
        raise DeployError(f"{name_of(obj)}: the Serve applications ask for {sum(need.values()):g} CPUs ({need}), "
                          f"more than the worker pods' {cpus:g} at minReplicas")


# --------------------------------------------------------------------------- env vars, ports, references
@functools.cache
def code_text() -> str:
    return "\n".join(p.read_text() for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py")))


def check_env(obj: dict) -> None:
    """Every env var a Ray pod or runtime env sets is read by the package; other containers use theirs."""
    names: list[tuple[str, str]] = []
    if obj["kind"] in RAY_KINDS:
        for where, pod in pod_templates(obj):
            names += [(e["name"], f"{where} pod") for c in pod["spec"]["containers"] for e in c.get("env", [])]
        runtime_env = yaml.safe_load(obj["spec"].get("runtimeEnvYAML") or "{}") or {}
        names += [(n, "runtimeEnvYAML") for n in runtime_env.get("env_vars", {})]
        for name, where in names:
            if not re.search(rf"[\"']{re.escape(name)}[\"']", code_text()):
                raise DeployError(f"{name_of(obj)}: env var {name} ({where}) is read nowhere in "
                                  f"{', '.join(CODE_DIRS)}")
        return
    for pod in [obj["spec"]["template"]] if "template" in obj.get("spec", {}) else []:
        for c in pod["spec"]["containers"]:
            used = yaml.safe_dump({k: c.get(k) for k in ("command", "args", "readinessProbe", "livenessProbe")})
            for e in c.get("env", []):
                if not re.search(rf"\$(\(|\{{)?{re.escape(e['name'])}\b", used):
                    raise DeployError(f"{name_of(obj)}: env var {e['name']} is not used by container {c['name']}")


def check_ports(obj: dict) -> None:
    """Head ports match rayStartParams (dashboard, GCS); Serve ports match serveConfigV2's http_options.port."""
    from ray._private.ray_constants import DEFAULT_DASHBOARD_PORT, DEFAULT_PORT

    spec = cluster_spec(obj)
    params = spec["headGroupSpec"].get("rayStartParams", {})
    head_ports = ray_container(spec["headGroupSpec"]["template"]).get("ports", [])
    head = {p.get("name"): p["containerPort"] for p in head_ports}
    for port_name, param, default in (("dashboard", "dashboard-port", DEFAULT_DASHBOARD_PORT),
                                      ("gcs-server", "port", DEFAULT_PORT)):
        want = int(params.get(param, default))
        if head.get(port_name) != want:
            raise DeployError(f"{name_of(obj)}: head container port {port_name!r} is {head.get(port_name)}, "
                              f"but Ray listens on {want}")
    if obj["kind"] == "RayService":
        want = int((yaml.safe_load(obj["spec"]["serveConfigV2"]).get("http_options") or {}).get("port", 8000))
        for where, pod in pod_templates(obj):
            got = {p.get("name"): p["containerPort"] for p in ray_container(pod).get("ports", [])}.get("serve")
            if got != want:
                raise DeployError(f"{name_of(obj)}: {where} pod's 'serve' port is {got}, but Serve listens on {want}")


def secret_refs(tree, found=None) -> set[tuple[str, str]]:
    """Every (secret name, key) referenced through secretKeyRef or a Secret volume's items anywhere in `tree`."""
    found = set() if found is None else found
    if isinstance(tree, dict):
        ref = tree.get("secretKeyRef")
        if isinstance(ref, dict):
            found.add((ref.get("name"), ref.get("key")))
        volume = tree.get("secret")
        if isinstance(volume, dict) and "secretName" in volume:
            found.update((volume["secretName"], i.get("key")) for i in volume.get("items") or [{}])  # {}: any key
        for v in tree.values():
            secret_refs(v, found)
    elif isinstance(tree, list):
        for v in tree:
            secret_refs(v, found)
    return found


def check_references(objs: list[dict]) -> None:
    """Secrets referenced are in the example (and not rendered); PVCs and the Redis address exist."""
    if any(o["kind"] == "Secret" for o in objs):
        raise DeployError("a Secret is part of the rendered manifests: secrets must not be committed")
    example = {(s["metadata"]["name"], k) for s in load_docs(SECRET_EXAMPLE) for k in s.get("stringData", {})}
    names = {name for name, _ in example}
    missing = sorted(((n, k) for n, k in secret_refs(objs) - example if k is not None or n not in names), key=str)
    if missing:
        raise DeployError(f"Secret {missing[0][0]!r} key {missing[0][1]!r} is referenced but not in "
                          f"{SECRET_EXAMPLE.name}")
    claims = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    for o in objs:
        if o["kind"] in RAY_KINDS:
            for where, pod in pod_templates(o):
                for v in pod["spec"].get("volumes", []):
                    claim = v.get("persistentVolumeClaim", {}).get("claimName")
                    if claim and claim not in claims:
                        raise DeployError(f"{name_of(o)}: {where} pod mounts PVC {claim!r}, which is not defined")
            ft = cluster_spec(o).get("gcsFaultToleranceOptions")
            if ft:
                host, _, port = ft["redisAddress"].rpartition(":")
                if not any(s["kind"] == "Service" and s["metadata"]["name"] == host and
                           any(p["port"] == int(port) for p in s["spec"]["ports"]) for s in objs):
                    raise DeployError(f"{name_of(o)}: redisAddress {ft['redisAddress']} is not a Service port "
                                      "of the deployment")


def check_redis(obj: dict) -> None:
    """The Redis StatefulSet persists with AOF (fsync before every answer) on a volume claim and takes its password
    from a Secret."""
    c = obj["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(c.get("command", []) + c.get("args", []))
    if "--appendonly yes" not in command:
        raise DeployError(f"{name_of(obj)}: redis-server must run with --appendonly yes")
    if "--appendfsync always" not in command:
        raise DeployError(f"{name_of(obj)}: redis-server must run with --appendfsync always (with everysec it may "
                          "answer before it writes, and a crash loses acknowledged records)")
    data = [m["mountPath"] for m in c.get("volumeMounts", [])
            if m["name"] in {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}]
    if not data or f"--dir {data[0]}" not in command:
        raise DeployError(f"{name_of(obj)}: redis-server --dir must be a volumeClaimTemplates volume")
    if not any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", [])):
        raise DeployError(f"{name_of(obj)}: the Redis password must come from a Secret")


def check_object(obj: dict) -> None:
    """Every check that applies to one rendered object."""
    validate(obj)
    check_env(obj)
    if obj["kind"] in RAY_KINDS:
        check_ports(obj)
    if obj["kind"] == "RayJob":
        check_rayjob(obj)
    if obj["kind"] == "RayService":
        check_rayservice(obj)
    if obj["kind"] == "StatefulSet" and obj["metadata"]["name"] == "rlhf-redis":
        check_redis(obj)


# --------------------------------------------------------------------------- Dockerfiles
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def check_dockerfile(path: Path, extra: str, uninstall: list[str] | None = None) -> None:
    """Installs the package with an extra that exists (then removes `uninstall`, as the Makefile does),
    copies files that exist, runs as non-root, bakes in no secrets."""
    ins = dockerfile_instructions(path)
    if uninstall is not None:
        removed = re.findall(r"pip uninstall -y ([\w\- ]+?)(?: &&|$)", " ".join(a for i, a in ins if i == "RUN"))
        if [r.split() for r in removed] != [uninstall]:
            raise DeployError(f"{path.name}: must `pip uninstall -y {' '.join(uninstall)}` as the Makefile does "
                              f"(found {removed})")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    runs = " ".join(a for i, a in ins if i == "RUN")
    if "pip wheel --no-deps -w /tmp/dist ." not in runs:
        raise DeployError(f"{path.name}: no `pip wheel --no-deps -w /tmp/dist .` (the image installs the wheel)")
    if re.search(r"pip install [^&]*-e ", runs):
        raise DeployError(f"{path.name}: an editable install (`pip install -e`): the image must run the wheel")
    installed = re.findall(r'pip install [^&]*?"\$\(ls /tmp/dist/rlhf_cluster-\*\.whl\)\[([\w,-]+)\]"', runs)
    if not installed:
        raise DeployError(f'{path.name}: no `pip install ... "$(ls /tmp/dist/rlhf_cluster-*.whl)[EXTRA]"`')
    for names in installed:
        for name in names.split(","):
            if name not in extras:
                raise DeployError(f"{path.name}: extra {name!r} is not in pyproject.toml ({', '.join(extras)})")
    if extra not in installed[0].split(","):
        raise DeployError(f"{path.name}: installs .[{installed[0]}], expected the {extra!r} extra")
    if [a for i, a in ins if i == "WORKDIR"][-1:] != [APP_DIR]:
        raise DeployError(f"{path.name}: WORKDIR must be {APP_DIR} (the manifests' working directory)")
    copied = []
    for i, a in ins:
        if i == "COPY":
            *sources, _dest = [s for s in a.split() if not s.startswith("--")]
            for s in sources:
                if not (ROOT / s).exists():
                    raise DeployError(f"{path.name}: COPY {s}: no such file in the repository")
                copied.append(s.rstrip("/"))
    if "rlhf_cluster" not in copied:
        raise DeployError(f"{path.name}: rlhf_cluster/ (the package, its presets inside) is not copied into the image")
    if f"rm -rf /tmp/dist {APP_DIR}/rlhf_cluster" not in runs:
        raise DeployError(f"{path.name}: the sources must be removed after the wheel is installed "
                          f"(`rm -rf /tmp/dist {APP_DIR}/rlhf_cluster`): from {APP_DIR} they would shadow it")
    ignore = (path.parent / f"{path.name}.dockerignore").read_text().split()
    for s in copied:
        if f"!{s}" not in ignore:
            raise DeployError(f"{path.name}.dockerignore excludes {s}, which the Dockerfile copies")
    users = [a for i, a in ins if i == "USER"]
    if not users or users[-1].split(":")[0] in {"0", "root"}:
        raise DeployError(f"{path.name}: the image must end with a non-root USER")
    for i, a in ins:
        if i in {"ENV", "ARG"} and re.search(r"(TOKEN|PASSWORD|SECRET|_KEY)\b", a, re.I):
            raise DeployError(f"{path.name}: {i} {a.split()[0]} looks like a secret baked into the image")


def example_tokens() -> dict:
    """The tokens file of secret.example.yaml, parsed: name -> {token, scopes}."""
    secret = next(s for s in load_docs(SECRET_EXAMPLE) if s["metadata"]["name"] == TOKENS_SECRET)
    return yaml.safe_load(secret["stringData"][TOKENS_KEY])


def check_example_tokens() -> None:
    """The example's tokens have scopes the apps know, and every token is the placeholder (which the apps refuse)."""
    from rlhf_cluster.serve.common import parse_scopes

    for name, spec in example_tokens().items():
        try:
            parse_scopes(spec.get("scopes"), f"{SECRET_EXAMPLE.name}: {name}.scopes")
        except ValueError as e:
            raise DeployError(str(e)) from None
        if spec.get("token") != PLACEHOLDER:
            raise DeployError(f"{SECRET_EXAMPLE.name}: {name}.token must be {PLACEHOLDER} in the example")


def check_tokens_file(path: Path) -> str:
    """A filled-in tokens file, checked as the apps load it (no placeholder left, no token shared by two names,
    known scopes); its principals and scopes."""
    from rlhf_cluster.serve.common import TokenAuth, load_scoped_tokens

    try:
        named = load_scoped_tokens(str(path))
    except ValueError as e:
        raise DeployError(str(e)) from None
    if not named:
        raise DeployError(f"tokens file {path}: no tokens")
    return TokenAuth(None, scoped=named).describe()


def makefile_uninstalls() -> list[str]:
    m = re.search(r"pip uninstall (?:-\w+ )*([\w\- ]+)", (ROOT / "Makefile").read_text())
    return m.group(1).split()


# --------------------------------------------------------------------------- CLI
def check_all() -> list[str]:
    """Every problem in both overlays, the secret example and the Dockerfiles, as messages."""
    problems = []

    def attempt(fn, *args):
        try:
            fn(*args)
        except DeployError as e:
            problems.append(str(e))

    for name, kdir in OVERLAYS.items():
        try:
            objs = render(kdir)
        except DeployError as e:
            problems.append(f"{name}: {e}")
            continue
        attempt(check_references, objs)
        for obj in objs:
            attempt(check_object, copy.deepcopy(obj))
    for s in load_docs(SECRET_EXAMPLE):
        attempt(validate_core, s)
    attempt(check_example_tokens)
    attempt(check_dockerfile, DEPLOY / "Dockerfile", "gpu")
    attempt(check_dockerfile, DEPLOY / "Dockerfile.cpu", "cpu", makefile_uninstalls())
    return problems


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["--tokens"] and len(sys.argv) == 3:
        try:
            print(f"{sys.argv[2]}: {check_tokens_file(Path(sys.argv[2]))}")
        except DeployError as e:
            sys.exit(str(e))
        sys.exit(0)
    found = check_all()
    print("\n".join(found) if found else "deploy/: every manifest and Dockerfile checks out")
    sys.exit(1 if found else 0)
