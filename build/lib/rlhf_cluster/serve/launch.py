"""Deploy the applications of a Ray Serve config file (configs/serve.yaml) from Python.

The file is a standard ServeDeploySchema, so KubeRay can use it verbatim as serveConfigV2; here
each application's import_path is imported, called with its `args` (app builders) and run with
serve.run under its name and route_prefix. Per-replica settings live in `args`, not in a
`deployments:` section, so that both launchers apply them the same way.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from rlhf_cluster.lib.config import CONFIG_DIR

DEFAULT_CONFIG = CONFIG_DIR / "serve.yaml"


def load_serve_config(path: str | Path = DEFAULT_CONFIG) -> ServeDeploySchema:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"serve config {path} does not exist")
    cfg = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for a in cfg.applications:
        if a.deployments:
            raise ValueError(f"{path}: application {a.name!r} has a `deployments:` section; "
                             "put replica settings in its args (see the file's header)")
    return cfg


def import_attr(import_path: str):
    """'package.module:attr' (or 'package.module.attr') -> the object."""
    module, sep, attr = import_path.partition(":")
    if not sep:
        module, _, attr = import_path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def build_application(import_path: str, args: dict | None) -> serve.Application:
    target = import_attr(import_path)
    if isinstance(target, serve.Application):
        if args:
            raise ValueError(f"{import_path} is a bound application; it takes no args")
        return target
    return target(args or {})


def run_application(app: serve.Application, name: str, route_prefix: str | None) -> serve.handle.DeploymentHandle:
    """serve.run, but a failed deployment raises naming its cause (the last line of each failing deployment's
    status message, e.g. "FileNotFoundError: reward model 'rm': /x is not a directory"), not only that it failed."""
    try:
        return serve.run(app, name=name, route_prefix=route_prefix)
    except RuntimeError as e:
        causes = []
        try:
            for dep_name, dep in serve.status().applications[name].deployments.items():
                lines = [ln.strip() for ln in (dep.message or "").splitlines()
                         if ln.strip() and not ln.strip().startswith("For further information visit")]
                if lines and dep.status != "HEALTHY":
                    causes.append(f"{dep_name}: {lines[-1]}")
        except Exception:  # no status to add: the original error is all there is
            pass
        if not causes:
            raise
        raise RuntimeError(f"application {name!r} failed to deploy: {'; '.join(causes)}") from e


def deploy(cfg: ServeDeploySchema, arg_overrides: dict[str, dict] | None = None, http_port: int | None = None,
           only: list[str] | None = None) -> dict[str, serve.handle.DeploymentHandle]:
    """Start Serve (HTTP options from the file) and run every application (or those named in `only`); returns
    their ingress handles.

    arg_overrides: {app name: {arg: value}} merged over the file's args (used by tests and the CLI).
    """
    names = [a.name for a in cfg.applications]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"no application named {unknown} in the serve config (it has {names})")
    http = cfg.http_options.model_dump(exclude_unset=True) if cfg.http_options else {}
    if http_port is not None:
        http["port"] = http_port
    serve.start(http_options=http)
    handles = {}
    for a in cfg.applications:
        if only is not None and a.name not in only:
            continue
        args = {**(a.args or {}), **(arg_overrides or {}).get(a.name, {})}
        handles[a.name] = run_application(build_application(a.import_path, args), a.name, a.route_prefix)
    return handles
