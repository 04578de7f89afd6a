"""``Client``: evaluate structures on one or several Crossfield servers.

``compute`` is one unary call (what an MD step needs: lowest latency, errors raised);
``compute_many`` streams (what a screening farm needs: many in flight, results in input
order or as they complete, per-structure failures reported in the results).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import grpc
from tqdm.auto import tqdm

from crossfield.client.connection import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Connection,
    RetryPolicy,
    RoundRobin,
    Security,
)
from crossfield.client.errors import DeadlineExceededError, from_rpc_error
from crossfield.client.results import Result, atoms_request, check_properties, response_result
from crossfield.client.stream import StreamRun, in_order
from crossfield.v1 import inference_pb2

DEFAULT_PROPERTIES = ("energy", "forces")


class Client:
    """A connection to Crossfield servers; reuse one for many calls, ``close()`` at the end.

    ``address`` is ``"host:port"`` or a list of them: unary calls go round-robin over the
    list and move on to the next address when one is unavailable; ``compute_many`` opens
    one stream per address. ``model``, ``version`` and ``head`` are defaults for every
    call (empty: the server's default model, its newest version, the model's first head).
    ``timeout`` is the deadline of a unary call in seconds, retries included. ``token`` is
    sent as ``authorization: Bearer <token>``; ``root_certificates`` (PEM) or ``tls=True``
    switch on TLS, ``server_name`` overrides the name checked in the certificate.
    ``retries`` is a ``RetryPolicy`` or a number of attempts. ``allow_extrapolation``
    asks for answers (flagged in ``Result.extrapolated_elements``) where a head would
    otherwise refuse elements outside its training data.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        model: str = "",
        version: str | None = None,
        head: str | None = None,
        timeout: float | None = 60.0,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        server_name: str | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        retries: RetryPolicy | int | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        allow_extrapolation: bool = False,
    ) -> None:
        addresses = [address] if isinstance(address, str) else list(address)
        self.security = Security(
            tls, root_certificates, token, server_name, client_certificate, client_key
        )
        self.retries = _retry_policy(retries)
        self.model = model or ""
        self.version = version or ""
        self.head = head or ""
        self.timeout = timeout
        self.allow_extrapolation = allow_extrapolation
        self._servers = RoundRobin(
            [Connection(a, self.security, max_message_bytes) for a in addresses]
        )
        self._metadata = self.security.metadata()

    @property
    def addresses(self) -> list[str]:
        return [c.address for c in self._servers.connections]

    # -- unary --------------------------------------------------------------------------------
    def compute(
        self,
        atoms,
        properties: Sequence[str] = DEFAULT_PROPERTIES,
        *,
        model: str | None = None,
        version: str | None = None,
        head: str | None = None,
        timeout: float | None = None,
        allow_extrapolation: bool | None = None,
    ) -> Result:
        """Evaluate one structure; raises a ``CrossfieldError`` subclass on failure."""
        request = self._request(
            atoms, check_properties(properties), model, version, head, allow_extrapolation
        )
        response = self._unary("Compute", request, timeout)
        return response_result(response)

    def list_models(self, timeout: float | None = None) -> inference_pb2.ListModelsResponse:
        """Every model version the server has loaded, with heads, elements and cutoff."""
        return self._unary("ListModels", inference_pb2.ListModelsRequest(), timeout)

    def get_model(
        self, name: str = "", version: str = "", timeout: float | None = None
    ) -> inference_pb2.ModelInfo:
        """One model version (empty: the default model, its newest version)."""
        request = inference_pb2.GetModelRequest(name=name, version=version)
        return self._unary("GetModel", request, timeout)

    def _unary(self, method: str, request, timeout: float | None):
        """One call with retries: backoff between attempts, the next server each time,
        and one deadline for all attempts together."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = self.retries.delays()
        connection = None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError(
                    f"{method}: no answer within {timeout} s", "DEADLINE_EXCEEDED"
                )
            servers = self._servers
            connection = servers.next() if connection is None else servers.after(connection)
            try:
                return getattr(connection.stub, method)(
                    request, timeout=remaining, metadata=self._metadata
                )
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                delay = next(delays, None) if error.code in self.retries.retry_on else None
                if delay is None:
                    raise error from None
                if deadline is not None:
                    delay = min(delay, max(0.0, deadline - time.monotonic()))
                time.sleep(delay)

    # -- streaming ----------------------------------------------------------------------------
    def compute_many(
        self,
        structures: Iterable,
        properties: Sequence[str] = DEFAULT_PROPERTIES,
        *,
        model: str | None = None,
        version: str | None = None,
        head: str | None = None,
        max_in_flight: int = 256,
        ordered: bool = True,
        progress: bool = False,
        total: int | None = None,
    ) -> Iterator[Result]:
        """Evaluate many structures over streams; an iterator of ``Result``.

        ``structures`` may be lazy (e.g. ``ase.io.iread``): at most ``max_in_flight`` are
        unanswered at a time, across all servers. Results come in input order, or as they
        complete with ``ordered=False`` (``Result.index`` says which input). A structure
        that fails has ``Result.error`` set and the run goes on; only a failure of the
        whole run (no server reachable, bad token) raises. ``progress`` shows a progress
        bar (``total`` for its length when ``structures`` has no ``len``).
        """
        wanted = check_properties(properties)

        def make_request(index: int, atoms) -> inference_pb2.ComputeRequest:
            return self._request(atoms, wanted, model, version, head, None, id=str(index))

        run = StreamRun(
            self._servers.connections,
            structures,
            make_request,
            max_in_flight=max_in_flight,
            retries=self.retries,
            metadata=self._metadata,
        )
        results = in_order(iter(run)) if ordered else iter(run)
        if total is None and hasattr(structures, "__len__"):
            total = len(structures)
        return _with_progress(results, progress, total)

    def _request(self, atoms, properties, model, version, head, allow_extrapolation, id=""):
        return atoms_request(
            atoms,
            properties,
            model=self.model if model is None else model,
            version=self.version if version is None else version,
            head=self.head if head is None else head,
            id=id,
            allow_extrapolation=(
                self.allow_extrapolation if allow_extrapolation is None else allow_extrapolation
            ),
        )

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        for connection in self._servers.connections:
            connection.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _retry_policy(retries: RetryPolicy | int | None) -> RetryPolicy:
    if retries is None:
        return RetryPolicy()
    if isinstance(retries, RetryPolicy):
        return retries
    return RetryPolicy(attempts=int(retries))


def _with_progress(
    results: Iterator[Result], progress: bool, total: int | None
) -> Iterator[Result]:
    """Yield ``results`` while a tqdm bar counts them (and the failures)."""
    with tqdm(total=total, disable=not progress, unit="structure", dynamic_ncols=True) as bar:
        failed = 0
        for result in results:
            if not result.ok:
                failed += 1
                bar.set_postfix(failed=failed, refresh=False)
            bar.update(1)
            yield result
