"""A model on a Crossfield server as a torch-sim model.

Every ``forward`` sends all systems of torch-sim's batched ``SimState`` over one stream
(``Client.compute_many``), so the server batches them with whatever else it serves, and
turns the answers back into tensors. torch-sim's own batching (its autobatchers) and the
server's batching then compose: torch-sim decides what runs together in the simulation,
the server what runs together on the device. This is the one module of the client that
imports torch (torch-sim needs it); nothing else in ``crossfield.client`` imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms
from torch_sim.models.interface import ModelInterface
from torch_sim.state import SimState

from crossfield.client.client import Client
from crossfield.client.results import has_volume


class RemoteTorchSimModel(ModelInterface):
    """torch-sim ``ModelInterface`` evaluating on a Crossfield server.

    ``address`` is ``"host:port"``, a list of them, or an existing ``Client`` (with its
    token, TLS and retry settings). ``model``, ``head`` and ``version`` choose what
    answers (empty: the server's defaults). Results come back in ``dtype`` on ``device``.
    Stress is asked for periodic systems only (zeros for molecules). A structure the
    server refuses raises its ``CrossfieldError``: a simulation cannot go on without it.
    """

    def __init__(
        self,
        address: str | Sequence[str] | Client,
        model: str = "",
        head: str = "",
        version: str = "",
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
        compute_stress: bool = True,
        compute_forces: bool = True,
        max_in_flight: int = 256,
        **client_options,
    ) -> None:
        super().__init__()
        if isinstance(address, Client):
            self.client, self._owns_client = address, False
        else:
            self.client, self._owns_client = Client(address, **client_options), True
        self.model_name, self.head, self.version = model, head, version
        self._device, self._dtype = torch.device(device), dtype
        self._compute_stress, self._compute_forces = compute_stress, compute_forces
        self._memory_scales_with = "n_atoms_x_density"
        self.max_in_flight = max_in_flight

    def forward(self, state: SimState | dict, **_) -> dict[str, torch.Tensor]:
        if isinstance(state, dict):
            state = SimState(**state, masses=torch.ones_like(state["positions"]))
        systems = _atoms(state)
        properties = ["energy"]
        if self._compute_forces:
            properties.append("forces")
        if self._compute_stress:
            properties.append("stress")  # sent only for periodic systems (results.py)
        results = list(
            self.client.compute_many(
                systems,
                properties,
                model=self.model_name,
                version=self.version,
                head=self.head,
                max_in_flight=self.max_in_flight,
            )
        )
        failed = next((r for r in results if not r.ok), None)
        if failed is not None:
            raise failed.error
        tensor = {"device": self._device, "dtype": self._dtype}
        out = {"energy": torch.tensor([r.energy for r in results], **tensor)}
        if self._compute_forces:
            out["forces"] = torch.as_tensor(np.concatenate([r.forces for r in results]), **tensor)
        if self._compute_stress:
            stress = [
                r.stress if has_volume(a) else np.zeros((3, 3)) for r, a in zip(results, systems)
            ]
            out["stress"] = torch.as_tensor(np.stack(stress), **tensor)
        return out

    def close(self) -> None:
        """Close the channel (only when this model opened it)."""
        if self._owns_client:
            self.client.close()


def _atoms(state: SimState) -> list[Atoms]:
    """One ``Atoms`` per system (torch-sim keeps lattice vectors as the columns of
    ``cell``; ASE as rows)."""
    pbc = [bool(p) for p in torch.as_tensor(state.pbc).reshape(-1).expand(3)]
    system_idx = state.system_idx.cpu().numpy()
    positions = state.positions.detach().cpu().double().numpy()
    numbers = state.atomic_numbers.cpu().numpy()
    cells = state.cell.detach().cpu().double().transpose(-1, -2).numpy()
    systems = []
    for index in range(state.n_systems):
        mask = system_idx == index
        systems.append(
            Atoms(numbers=numbers[mask], positions=positions[mask], cell=cells[index], pbc=pbc)
        )
    return systems
