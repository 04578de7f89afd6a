"""A Crossfield model as a torch-sim model, in this process.

torch-sim (PyPI ``torch-sim-atomistic``) runs batched MD and relaxations over one
``SimState`` holding many systems; its integrators and optimisers talk to any model
through ``ModelInterface``. This adapter turns a state into one ragged graph batch (every
system with the chosen head), runs one forward pass and hands back energies, forces and
stress in torch-sim's layout. Only this module imports ``torch_sim``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_sim.models.interface import ModelInterface
from torch_sim.state import SimState

from .graph import Structure, build_batch
from .mace import CrossfieldMACE


class CrossfieldTorchSimModel(ModelInterface):
    """torch-sim ``ModelInterface`` over a ``CrossfieldMACE``.

    ``head`` is the level of theory every system is evaluated with (None: the model's
    first head). The model is converted to ``dtype`` and ``device`` on a copy when they
    differ, so the caller's model is never changed. Stress is computed for periodic
    systems (zeros for molecules, where it is undefined) when ``compute_stress``.
    """

    def __init__(
        self,
        model: CrossfieldMACE,
        head: str | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
        compute_stress: bool = True,
        compute_forces: bool = True,
    ) -> None:
        super().__init__()
        heads = model.config.head_names
        if head is not None and head not in heads:
            raise ValueError(f"head: unknown head {head!r}; this model has heads {heads}")
        self._device, self._dtype = torch.device(device), dtype
        self._compute_stress, self._compute_forces = compute_stress, compute_forces
        self._memory_scales_with = "n_atoms_x_density"  # a radial cutoff: edges grow with density
        current = next(model.parameters())
        if current.dtype != dtype or current.device != self._device:
            import copy

            model = copy.deepcopy(model).to(device=self._device, dtype=dtype)
        self.model = model.eval()
        self.head = head or heads[0]

    def forward(self, state: SimState | dict, **_) -> dict[str, torch.Tensor]:
        if isinstance(state, dict):
            state = SimState(**state, masses=torch.ones_like(state["positions"]))
        structures = list(_structures(state, self.head))
        config = self.model.config
        batch = build_batch(
            structures, config.elements, config.r_max, config.head_names, self._dtype, self._device
        )
        out = self.model(
            batch,
            compute_forces=self._compute_forces,
            compute_stress=self._compute_stress,
            training=False,
        )
        results = {"energy": out["energy"].detach()}
        if self._compute_forces:
            results["forces"] = out["forces"].detach()
        if self._compute_stress:
            periodic = torch.tensor([any(s.pbc) for s in structures], device=self._device)
            results["stress"] = out["stress"].detach() * periodic[:, None, None]
        return results


def _structures(state: SimState, head: str):
    """One ``Structure`` per system of ``state`` (torch-sim keeps lattice vectors as the
    columns of ``cell``; ours are rows)."""
    pbc = tuple(bool(p) for p in torch.as_tensor(state.pbc).reshape(-1).expand(3))
    system_idx = state.system_idx.cpu().numpy()
    positions = state.positions.detach().cpu().double().numpy()
    numbers = state.atomic_numbers.cpu().numpy()
    cells = state.cell.detach().cpu().double().transpose(-1, -2).numpy()
    for index in range(state.n_systems):
        mask = system_idx == index
        yield Structure(
            numbers=numbers[mask].astype(np.int64),
            positions=positions[mask],
            cell=cells[index],
            pbc=pbc,
            head=head,
        )
