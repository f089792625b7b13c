"""Taking tasks from a Flower Runtime API (flwr 1.42.0 exactly; see flower/pins.py), as flwr's
SuperExec does: the node's warm worker takes ClientApp tasks from its SuperNode
(flower/supernode.py), the hub's warm ServerApp takes ServerApp tasks from the SuperLink
(flower/warm_serverapp.py).
"""

from __future__ import annotations


def runtime_client(address: str, root_certificates: bytes | None = None):
    """A Runtime API client that speaks as flwr's SuperExec (plain HTTP when no certificates
    are given: the SuperNode's runtime API listens on this machine only)."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )


def acquire_task(client, task_type: str):
    """(task, token) of one pending task of `task_type` (flwr's `TaskType`), or None."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
    if res.HasField("task") and res.token:
        return res.task, res.token
    return None
