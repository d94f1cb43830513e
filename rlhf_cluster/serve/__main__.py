"""python -m rlhf_cluster.serve [--config configs/serve.yaml] [--port 8000] [--apps reward policy ...]: run the service.

The apps of configs/serve.yaml: reward (/v1/score, /get_reward), checkpoints (/v1/checkpoints), policy
(OpenAI-compatible at /policy/v1) and feedback (/v1/feedback); --apps deploys only those named.

Joins the cluster of $RAY_ADDRESS or starts a local one, deploys the config and blocks until Ctrl-C (or SIGTERM).
Then a local cluster is stopped at once, every process it started with it (the replicas' graceful shutdown is for
redeploys, not for an operator stopping the service); on a joined cluster the apps are shut down gracefully.
The shared bearer token comes from $RLHF_SERVE_TOKEN or $RLHF_SERVE_TOKEN_FILE, with the scopes of
$RLHF_SERVE_TOKEN_SCOPES (unset: generate, score, feedback); without either, this launcher uses its own token,
generated once into ~/.cache/rlhf-cluster/serve_token (mode 0600), and gives it the admin scope unless
$RLHF_SERVE_TOKEN_SCOPES says otherwise. It prints which token and which scopes. Named tokens: $RLHF_SERVE_TOKENS_FILE.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import time

from rlhf_cluster.lib.registry import default_registry_dir
from rlhf_cluster.serve.common import TOKEN_ENV, TOKEN_FILE_ENV, TOKEN_SCOPES_ENV, shared_token_scopes
from rlhf_cluster.serve.launch import DEFAULT_CONFIG, deploy, load_serve_config


def ensure_token() -> None:
    """Say which shared token the apps take, and with which scopes. The caller's ($RLHF_SERVE_TOKEN /
    $RLHF_SERVE_TOKEN_FILE) keeps the scopes it is given (by default a client's, no operator routes). Without one,
    this launcher's own token is made admin: the service binds 127.0.0.1 for the user who started it, whose quick
    start (README) chats, sends feedback and starts rounds with that one token."""
    ours = False
    if os.environ.get(TOKEN_ENV) or os.environ.get(TOKEN_FILE_ENV):
        where = f"${TOKEN_ENV}" if os.environ.get(TOKEN_ENV) else os.environ[TOKEN_FILE_ENV]
    else:
        path = default_registry_dir().parent / "serve_token"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
        os.environ[TOKEN_FILE_ENV] = str(path)  # inherited by a local cluster's workers, as are the scopes
        if TOKEN_SCOPES_ENV not in os.environ:
            os.environ[TOKEN_SCOPES_ENV], ours = "admin", True
        where = f"{path} (curl -H \"Authorization: Bearer $(cat {path})\" ...)"
    try:
        scopes, source = shared_token_scopes()
    except ValueError as e:
        raise SystemExit(f"python -m rlhf_cluster.serve: {e}") from None
    if ours:
        source = f"this launcher's own token: ${TOKEN_SCOPES_ENV} set to admin"
    print(f"bearer token: {where}; scopes: {', '.join(sorted(scopes))} ({source})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rlhf_cluster.serve")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--port", type=int, default=None, help="override http_options.port")
    ap.add_argument("--apps", nargs="+", default=None, help="deploy only these applications of the config")
    ap.add_argument("--num-cpus", type=float, default=4,
                    help="logical CPUs of the local cluster this starts (as the jobs' ray.num_cpus): the apps and a "
                         "feedback round started over HTTP share it (ignored when joining $RAY_ADDRESS's cluster)")
    args = ap.parse_args(argv)
    cfg = load_serve_config(args.config)
    ensure_token()
    import ray

    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address) if address else ray.init(num_cpus=args.num_cpus)
    deploy(cfg, http_port=args.port, only=args.apps)
    port = args.port or (cfg.http_options.port if cfg.http_options else 8000)
    routes = {"reward": "/v1/score, /get_reward", "checkpoints": "/v1/checkpoints", "policy": "/policy/v1 (OpenAI)",
              "feedback": "/v1/feedback"}
    shown = [routes.get(a.name, a.route_prefix) for a in cfg.applications if not args.apps or a.name in args.apps]
    print(f"serving on http://127.0.0.1:{port}  ({'; '.join(shown)}); Ctrl-C stops")
    import httpx

    for app in cfg.applications:  # say what each reward app scores with (its /healthz "source")
        if app.import_path.startswith("rlhf_cluster.serve.reward_app") and (not args.apps or app.name in args.apps):
            route = (app.route_prefix or "/").rstrip("/")
            try:
                health = httpx.get(f"http://127.0.0.1:{port}{route}/healthz", timeout=30).json()
                print(f"{app.name}: serving {health.get('source', '?')}")
            except (httpx.HTTPError, ValueError) as e:
                print(f"{app.name}: /healthz did not answer ({e})")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
        if address:
            from ray import serve

            serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
