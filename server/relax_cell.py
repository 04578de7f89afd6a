"""What an optimiser moves: atom positions, or positions and cell as ASE's FrechetCellFilter.

``Coordinates`` turns a structure into generalised coordinates and forces of shape [m, 3]
for an optimiser (``relax_optimizers.py``) and the optimiser's next coordinates back into
positions and cell. With the cell relaxed, the coordinates are ASE's FrechetCellFilter's
(``ase.filters``; ``ase._4.optimize.cellutil`` from ASE 3.29): the positions in the
undeformed cell, and the matrix logarithm of the deformation gradient ``F`` (current cell
= original cell @ F.T) times ``exp_cell_factor`` = number of atoms; the cell's generalised
force is the virial carried through the Frechet derivative of ``expm``, divided by the
same factor. So convergence is ASE's too: every row of the generalised forces, atoms and
cell alike, below ``fmax``. ASE's coordinates differ from these by a constant (it takes
the logarithm of ``n F``), which no optimiser step sees.

Fixed atoms are ASE's FixAtoms: their forces count as zero, and their positions stay
where they are (scaled with the cell when the cell moves, as ``Atoms.set_cell(...,
scale_atoms=True)`` does before the constraint applies).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import expm, expm_frechet, logm


class Coordinates:
    """One structure's positions (and cell) as an optimiser sees them."""

    def __init__(
        self,
        positions: np.ndarray,
        cell: np.ndarray | None,
        relax_cell: bool,
        fixed: np.ndarray,
    ) -> None:
        self.positions = np.array(positions, dtype=np.float64)
        self.cell = None if cell is None else np.array(cell, dtype=np.float64)
        self.relax_cell = relax_cell
        self.fixed = fixed  # [n] bool
        self._original_cell = None if self.cell is None else self.cell.copy()
        self._factor = float(len(self.positions))  # ASE's exp_cell_factor default

    def deformation(self) -> np.ndarray:
        """F with cell = original cell @ F.T."""
        return np.linalg.solve(self._original_cell, self.cell).T

    def x(self) -> np.ndarray:
        """Generalised coordinates: [n, 3], or [n + 3, 3] with the cell."""
        if not self.relax_cell:
            return self.positions.copy()
        deformation = self.deformation()
        atoms = np.linalg.solve(deformation, self.positions.T).T
        return np.vstack([atoms, _real(logm(deformation)) * self._factor])

    def forces(self, forces: np.ndarray, stress: np.ndarray | None) -> np.ndarray:
        """Generalised forces from the model's forces (and stress, with the cell)."""
        forces = np.where(self.fixed[:, None], 0.0, forces)
        if not self.relax_cell:
            return forces
        volume = abs(np.linalg.det(self.cell))
        virial = -volume * stress
        deformation = self.deformation()
        log_deformation = _real(logm(deformation))
        cell_gradient = virial @ np.linalg.inv(deformation.T)
        cell_force = np.zeros((3, 3))
        for mu in range(3):
            for nu in range(3):
                direction = np.zeros((3, 3))
                direction[mu, nu] = 1.0
                derivative = expm_frechet(log_deformation, direction, compute_expm=False)
                cell_force[mu, nu] = np.sum(derivative * cell_gradient)
        return np.vstack([forces @ deformation, cell_force / self._factor])

    def move(self, x: np.ndarray) -> None:
        """Take the optimiser's next coordinates ``x``."""
        n = len(self.positions)
        if not self.relax_cell:
            self.positions = np.where(self.fixed[:, None], self.positions, x)
            return
        deformation = expm(x[n:] / self._factor)
        cell = self._original_cell @ deformation.T
        scaled = self.positions @ np.linalg.solve(self.cell, cell)  # Atoms.set_cell(scale_atoms)
        self.positions = np.where(self.fixed[:, None], scaled, x[:n] @ deformation.T)
        self.cell = cell


def _real(matrix: np.ndarray) -> np.ndarray:
    """scipy's logm returns complex for some real input with a negligible imaginary part."""
    return np.real(matrix)
