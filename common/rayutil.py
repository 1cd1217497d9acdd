"""Starting or joining Ray the same way in every entry point (tokenize, train, generate, eval).

With an address (an argument, or RAY_ADDRESS, as `ray job submit` sets) the job joins that cluster. Without one
it starts a Ray for this machine alone, reachable from this machine only:

- On Linux Ray treats the machine as a node of a would-be cluster: it advertises the machine's external address
  and its gRPC servers (GCS, raylet, object manager, agents) listen on every interface. Ray's own single-machine
  mode, the default on macOS and Windows, advertises 127.0.0.1 and binds there; its switch is
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read by Ray at import, so it is also set on the imported constant).
  `_node_ip_address="127.0.0.1"` alone does not do it: Ray maps a loopback address back to the external one.
- The dashboard, when included, binds 127.0.0.1.
Ray 2.60 also requires its auth token (written to ~/.ray/auth_token) from every client by default.
"""
from __future__ import annotations

import logging
import os
from typing import Any

LOOPBACK = "127.0.0.1"
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray Train's placement-group cleaner asks the State API, served by the dashboard, whether the controller is
# alive, once a second; a local Ray without the dashboard answers every ask with a warning (~300 lines in a
# `make demo` run). The cleaner still removes the placement group when the controller dies.
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """worker_process_setup_hook of a local Ray started without the dashboard (see QUIET_LOGGERS)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, include_dashboard: bool = False,
             **kwargs: Any) -> bool:
    """Join `address` (or $RAY_ADDRESS), or start a loopback-only local Ray. Does nothing when Ray is already
    initialized (tests start their own). Returns True if this call started or joined Ray (the caller shuts it
    down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return True
    # Respect an explicit opt-out (=1): then Ray binds every interface, as it does on Linux by default.
    if os.environ.setdefault(SINGLE_MACHINE_ENV, "0") == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    if not include_dashboard:
        runtime_env.setdefault("worker_process_setup_hook", f"{__name__}.quiet_worker_logs")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard, dashboard_host=LOOPBACK,
             runtime_env=runtime_env, **kwargs)
    return True


def node_ip() -> str:
    """The address the running Ray advertises for this node (127.0.0.1 for a Ray started by `init_ray`)."""
    import ray

    return ray.util.get_node_ip_address()
