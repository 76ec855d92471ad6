"""The loopback Kubernetes API server the tests drive the real client against.

It lives in the simulator (`collectors/simulated/apiserver.py`), which serves scenarios from it;
these names keep the tests' `fake.pod(...)`, `fake.FakeApiServer()` spelling.
"""

from __future__ import annotations

from collectors.simulated.apiserver import (
    HANG,
    REFUSED,
    UNAVAILABLE,
    UP,
    SimulatedApiServer,
    api_client_for,
    job,
    namespace,
    node,
    pod,
    replicaset,
)

FakeApiServer = SimulatedApiServer

__all__ = ["HANG", "REFUSED", "UNAVAILABLE", "UP", "FakeApiServer", "SimulatedApiServer", "api_client_for",
           "job", "namespace", "node", "pod", "replicaset"]
