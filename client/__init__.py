"""crossfield.client: talk to a Crossfield server from numpy and ASE, without torch.

- ``RemoteCalculator``: an ASE calculator (MD, optimisers, NEB) backed by a server;
- ``Client`` / ``AsyncClient``: ``compute`` one structure, ``compute_many`` streamed;
- ``crossfield.client.errors``: the exceptions server errors become.

A simulation machine needs only numpy, ase, grpcio, protobuf and tqdm; importing this
package never imports torch (a test checks it).
"""

from crossfield.client.aio import AsyncClient
from crossfield.client.calculator import RemoteCalculator
from crossfield.client.client import Client
from crossfield.client.connection import RetryPolicy
from crossfield.client.errors import (
    AuthenticationError,
    CrossfieldError,
    DeadlineExceededError,
    InvalidStructureError,
    ModelNotFoundError,
    PoisonStructureError,
    RemoteError,
    ServerBusyError,
    ServerUnavailableError,
)
from crossfield.client.results import Result

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "CrossfieldError",
    "DeadlineExceededError",
    "InvalidStructureError",
    "ModelNotFoundError",
    "PoisonStructureError",
    "RemoteCalculator",
    "RemoteError",
    "Result",
    "RetryPolicy",
    "ServerBusyError",
    "ServerUnavailableError",
]
