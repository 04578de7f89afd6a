"""The weighted training loss on energy per atom, forces and stress.

Every term is a *sum* over the local batch divided by a count of the *global* batch
(structures for energy and stress, atoms for forces). Summing the local losses of all
data-parallel ranks therefore gives exactly the single-process loss of the global batch,
which is what makes distributed and single-process training agree (DDP averages
gradients, so each rank scales its loss by the world size).

Energies enter per atom so that large and small cells weigh alike; per-structure weights
(configuration weight x property weight x head loss weight, zero where a label is
missing) multiply every term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crossfield.training.data import Targets

LOSS_KINDS = ("mse", "huber")


@dataclass
class LossConfig:
    """Loss weights and form; Huber is robust to the outliers that big DFT sets contain."""

    kind: str = "mse"
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    stress_weight: float = 0.0
    huber_delta: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss.kind: must be one of {LOSS_KINDS}, got {self.kind!r}")
        for name in ("energy_weight", "forces_weight", "stress_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name}: must be >= 0, got {getattr(self, name)}")
        if not self.huber_delta > 0:
            raise ValueError(f"loss.huber_delta: must be positive, got {self.huber_delta}")


def _pointwise(
    prediction: torch.Tensor, reference: torch.Tensor, config: LossConfig
) -> torch.Tensor:
    if config.kind == "huber":
        return torch.nn.functional.huber_loss(
            prediction, reference, reduction="none", delta=config.huber_delta
        )
    return torch.square(prediction - reference)


def weighted_loss(
    output: dict[str, torch.Tensor],
    targets: Targets,
    config: LossConfig,
    num_structures: int | None = None,
    num_atoms: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its detached parts.

    ``num_structures``/``num_atoms`` are the sizes of the global batch (default: this
    batch). Stress is only used when its weight is non-zero and ``output`` holds it.
    """
    num_structures = targets.energy.shape[0] if num_structures is None else num_structures
    num_atoms = targets.forces.shape[0] if num_atoms is None else num_atoms
    n = targets.num_atoms.to(targets.energy.dtype)

    energy = _pointwise(output["energy"] / n, targets.energy / n, config)
    energy_term = torch.sum(targets.energy_weight * energy) / num_structures
    total = config.energy_weight * energy_term
    parts = {"energy": energy_term.detach()}

    if config.forces_weight > 0:
        atom_weight = torch.repeat_interleave(targets.forces_weight, targets.num_atoms)
        forces = _pointwise(output["forces"], targets.forces, config).mean(dim=-1)
        forces_term = torch.sum(atom_weight * forces) / num_atoms
        total = total + config.forces_weight * forces_term
        parts["forces"] = forces_term.detach()

    if config.stress_weight > 0:
        if "stress" not in output:
            raise ValueError("loss.stress_weight > 0 but the model output has no stress")
        stress = _pointwise(output["stress"], targets.stress, config).mean(dim=(-1, -2))
        stress_term = torch.sum(targets.stress_weight * stress) / num_structures
        total = total + config.stress_weight * stress_term
        parts["stress"] = stress_term.detach()
    return total, parts
