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
    RetryPolicy,
    RoundRobin,
    Security,
)
from crossfield.client.errors import from_rpc_error, lost_in_flight
from crossfield.client.relax import RelaxResult, relax_many
from crossfield.client.results import Result, atoms_request, check_properties, response_result
from crossfield.client.session import Session
from crossfield.client.stream import StreamRun, in_order
from crossfield.v1 import inference_pb2

DEFAULT_PROPERTIES = ("energy", "forces")


class Client:
    """A connection to Crossfield servers; reuse one for many calls, ``close()`` at the end.

    ``address`` is ``"host:port"`` or a list of them: unary calls go round-robin over the
    servers that are up and move on to the next address when one fails; ``compute_many``
    opens one stream per address. ``model``, ``version`` and ``head`` are defaults for
    every call (empty: the server's default model, its newest version, the model's first
    head). ``timeout`` is the deadline of a unary call in seconds, retries and waiting for
    a server to come up included; ``compute_many`` waits as long for a server to come
    (back) up. ``token`` is sent as ``authorization: Bearer <token>``;
    ``root_certificates`` (PEM) or ``tls=True`` switch on TLS, ``server_name`` overrides
    the name checked in the certificate. ``retries`` is a ``RetryPolicy`` or a number of
    attempts (``connection.py`` says what gRPC retries and what the client does; a
    structure in flight when servers went away is not replayed on every other, see
    ``RetryPolicy.poison_after``). ``allow_extrapolation``
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
        self._servers = RoundRobin(addresses, self.security, max_message_bytes, self.retries)
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
        response = self._unary("Compute", request, timeout, poison=True)
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

    def _unary(self, method: str, request, timeout: float | None, poison: bool = False):
        """One call: to a server that is up (waiting for one within the deadline), then on
        failure to the next server after a backoff, with one deadline for everything.

        With ``poison``, a call that failed with UNAVAILABLE on a server that then no
        longer answers counts as lost with that server; after ``retries.poison_after``
        such losses the structure is failed with ``PoisonStructureError``.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        servers = self._servers
        lost: list[str] = []
        failures = 0
        connection = None
        while True:
            connection = servers.pick(deadline, after=connection)
            if connection is None:
                raise servers.no_server(method, timeout)
            try:
                return getattr(connection.stub, method)(
                    request,
                    timeout=_remaining(deadline),
                    metadata=self._metadata,
                    wait_for_ready=servers.waits_for_ready,
                )
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            if poison and connection.went_away(error):
                lost.append(connection.address)
                limit = self.retries.poison_after
                if limit is not None and len(lost) >= limit:
                    raise lost_in_flight(lost, method) from None
            failures += 1
            retry = _retryable(error, self.retries, len(servers))
            if not retry or failures >= self.retries.attempts:
                raise error from None
            delay = self.retries.delay(failures - 1)
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(delay)

    # -- MD sessions --------------------------------------------------------------------------
    def session(
        self,
        *,
        model: str | None = None,
        version: str | None = None,
        head: str | None = None,
        timeout: float | None = None,
        allow_extrapolation: bool | None = None,
    ) -> Session:
        """An MD session (``session.py``): ``Session.compute(atoms, properties)`` sends the
        structure once and then only its new positions, to a server that keeps its
        neighbour list; ``close()`` it at the end. Raises ``SessionsUnsupportedError`` on
        the first evaluation against a server without sessions."""
        request = {
            "model": self.model if model is None else model,
            "version": self.version if version is None else version,
            "head": self.head if head is None else head,
            "allow_extrapolation": (
                self.allow_extrapolation if allow_extrapolation is None else allow_extrapolation
            ),
        }
        timeout = self.timeout if timeout is None else timeout
        return Session(self._servers, self._metadata, self.retries, timeout, request)

    # -- relaxation --------------------------------------------------------------------------
    def relax_many(self, structures: Iterable, **settings) -> Iterator[RelaxResult]:
        """Relax ASE ``structures`` on the server, all in flight together with every other
        client's; results as they finish. ``settings``: ``optimizer`` ("fire" or
        "lbfgs"), ``fmax``, ``max_steps``, ``relax_cell``, ``trajectory_every``,
        ``timeout`` (per structure), ``model``/``version``/``head``, ``max_in_flight``.
        A server that stops hands its unfinished structures on to the next one, from their
        last state; see :func:`crossfield.client.relax.relax_many`."""
        return relax_many(self, structures, **settings)

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
            self._servers,
            structures,
            make_request,
            max_in_flight=max_in_flight,
            retries=self.retries,
            metadata=self._metadata,
            timeout=self.timeout,
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
        self._servers.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _retryable(error, retries: RetryPolicy, servers: int) -> bool:
    """Whether the client retries ``error``. On a single address the channel's own retry
    policy has already retried what a server refused for now (RESOURCE_EXHAUSTED,
    CANCELLED); with several addresses, any ``retry_on`` status moves to the next one."""
    if error.code not in retries.retry_on:
        return False
    return servers > 1 or error.code not in ("RESOURCE_EXHAUSTED", "CANCELLED")


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
