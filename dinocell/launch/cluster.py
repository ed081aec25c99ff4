"""Where the launcher talks to: the API client (explicit host, in-cluster, kubeconfig) and the job's namespace."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dinocell.launch.jobspec import JobSpec

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def make_api_client(host: str | None = None):
    """ApiClient for: an explicit `host` (tests, proxies), else in-cluster config, else the default kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if host:
        cfg.host = host
        return client.ApiClient(cfg)
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        try:
            # KUBECONFIG read now: the client's own default is frozen when the module is first imported.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
        except (config.ConfigException, OSError) as e:
            raise RuntimeError(
                "no Kubernetes credentials: not running in a pod (no service-account token) and no usable kubeconfig "
                f"({e}); pass api_client=... or host=..."
            ) from e
    return client.ApiClient(cfg)


def resolve_namespace(
    namespace: str | None = None, spec: JobSpec | None = None, sa_file: Path = SA_NAMESPACE_FILE
) -> str:
    """Explicit argument, else JobSpec.namespace, else the namespace of the pod we run in (a KFP step's own)."""
    if namespace:
        return namespace
    if spec is not None and spec.namespace:
        return spec.namespace
    if sa_file.is_file():
        text = sa_file.read_text().strip()
        if text:
            return text
    raise ValueError(
        f"no namespace for the job: pass namespace=..., set JobSpec.namespace, or run inside a pod ({sa_file} is absent)"
    )


def api_error_text(e) -> str:
    """The API server's message from an ApiException (its Status body), else the HTTP reason."""
    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(e.body or e.reason)
