"""``RemoteCalculator``: an ASE calculator whose energies and forces come from a server.

Works wherever an ASE calculator does (MD, optimisers, cell filters, NEB images), on a
channel kept open for the calculator's life. Evaluations go through an MD session
(``session.py``): the structure is sent once and then only its new positions (and cell),
and the server keeps its neighbour list between steps, which is what an MD driver or an
optimiser does to one atoms object; a new structure simply starts the session again. A
server without sessions is detected on the first evaluation and answered by unary
``Compute`` calls from then on (``session=False`` asks for those from the start). Energy,
forces and per-atom energies come back in every evaluation (they cost the server one
backward pass, and the bytes are few); stress only once it has been asked for, since it
needs the strain derivative that MD at constant volume does not use, and from then on
with every evaluation, so that ``get_forces`` then ``get_stress`` (a cell filter) is one
call.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from crossfield.client.client import Client
from crossfield.client.connection import RetryPolicy
from crossfield.client.results import Result, has_volume
from crossfield.client.session import Session, SessionsUnsupportedError


class RemoteCalculator(Calculator):
    """ASE calculator evaluating a model served by ``crossfield serve``.

    ``address`` is ``"host:port"``, a list of them (round-robin), or an existing
    ``Client`` to share (e.g. one channel for all images of an NEB). ``model``, ``head``
    and ``version`` choose what answers (empty: the server's defaults). ``timeout`` is the
    deadline per evaluation in seconds; UNAVAILABLE is retried with exponential backoff
    (``retries``: a ``RetryPolicy`` or a number of attempts). Server errors are raised as
    ``crossfield.client.errors`` exceptions, e.g. ``InvalidStructureError`` for an element
    the model does not know. After each evaluation ``last_result`` holds the ``Result``
    (with the model, version and head that answered, and the server's queue and compute
    seconds). ``client_certificate`` and ``client_key`` (PEM bytes) authenticate this
    client to a server that demands mutual TLS. With ``allow_extrapolation=True`` a head
    answers for elements outside its training data instead of refusing them; such answers
    put the atomic numbers in ``results["extrapolated_elements"]`` and warn once.
    ``session`` (default True) evaluates through an MD session where the server has them.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        address: str | Sequence[str] | Client,
        model: str = "",
        head: str | None = None,
        version: str | None = None,
        timeout: float | None = 60.0,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        server_name: str | None = None,
        retries: RetryPolicy | int | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        allow_extrapolation: bool = False,
        session: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(address, Client):
            self.client, self._owns_client = address, False
        else:
            self.client = Client(
                address,
                timeout=timeout,
                token=token,
                tls=tls,
                root_certificates=root_certificates,
                server_name=server_name,
                retries=retries,
                client_certificate=client_certificate,
                client_key=client_key,
            )
            self._owns_client = True
        self.model = model
        self.head = head or ""
        self.version = version or ""
        self.timeout = timeout
        self.last_result: Result | None = None
        self.stress_wanted = False  # once asked for, stress comes with every evaluation
        self.allow_extrapolation = allow_extrapolation
        self._warned_extrapolation = False
        self._session: Session | None = None
        if session:
            self._session = self.client.session(
                model=model,
                version=self.version,
                head=self.head,
                timeout=timeout,
                allow_extrapolation=allow_extrapolation,
            )

    def calculate(
        self,
        atoms=None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        properties = properties or ["energy"]
        super().calculate(atoms, properties, system_changes)
        wanted = ["energy", "forces", "energies"]
        if "stress" in properties:
            if not has_volume(self.atoms):
                raise PropertyNotImplementedError(
                    "stress: defined only for periodic structures with a non-singular cell"
                )
            self.stress_wanted = True
        if self.stress_wanted and has_volume(self.atoms):
            wanted.append("stress")
        result = self._evaluate(wanted)
        self.last_result = result
        self.results = {
            "energy": result.energy,
            "free_energy": result.energy,
            "forces": result.forces,
            "energies": result.energies,
        }
        if result.stress is not None:
            self.results["stress"] = full_3x3_to_voigt_6_stress(result.stress)
        if result.extrapolated_elements:
            self.results["extrapolated_elements"] = list(result.extrapolated_elements)
            self._warn_extrapolation(result)

    def _evaluate(self, wanted: list[str]) -> Result:
        if self._session is not None:
            try:
                return self._session.compute(self.atoms, wanted)
            except SessionsUnsupportedError:  # an older server: unary calls from now on
                self._session.close()
                self._session = None
        return self.client.compute(
            self.atoms,
            wanted,
            model=self.model,
            version=self.version,
            head=self.head,
            timeout=self.timeout,
            allow_extrapolation=self.allow_extrapolation,
        )

    @property
    def uses_session(self) -> bool:
        """Whether evaluations go through an MD session (False once a server said it has
        none)."""
        return self._session is not None

    def _warn_extrapolation(self, result: Result) -> None:
        """Warn on the first flagged answer only: an MD run would otherwise warn every step."""
        if self._warned_extrapolation:
            return
        self._warned_extrapolation = True
        warnings.warn(
            f"head {result.head!r} of {result.model}:{result.version} was not trained on "
            f"elements {list(result.extrapolated_elements)}: its answers for them are "
            "extrapolations (allow_extrapolation=True)",
            stacklevel=3,
        )

    def close(self) -> None:
        """End the session, and close the channel (only when this calculator opened it)."""
        if self._session is not None:
            self._session.close()
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> RemoteCalculator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
