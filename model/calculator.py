"""An in-process ASE calculator over a Crossfield model.

This is the reference that remote results are compared with: it takes the same path as
the server (``Structure.from_atoms`` -> ``build_batch`` -> one forward pass), so a model
served in float64 and this calculator in float64 agree to float noise. It is also the
baseline that ``bench/md_latency.py`` measures the remote overhead against.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from crossfield.model.backends import compile_model, default_cache_dir, ready_backend
from crossfield.model.graph import Structure, build_batch


class CrossfieldCalculator(Calculator):
    """ASE calculator evaluating a ``CrossfieldMACE`` (or a checkpoint path) in this process.

    ``head`` selects the level of theory (None: the model's first head). ``dtype`` is the
    precision of the evaluation; when it differs from the model's, a converted copy is
    used so the caller's model is never changed behind their back. Stress is computed
    only when asked for (it costs a strain derivative that MD does not need) and only for
    periodic structures, where it is defined; once asked for, it comes with every later
    evaluation, so that ``get_forces`` then ``get_stress`` (a cell filter) is one pass.

    ``backend`` is how the model runs (``crossfield.model.backends``). The default,
    ``auto``, runs the AOTInductor package of this model, dtype and device when
    ``cache_dir`` (default: the user's cache, shared with ``crossfield compile`` and
    ``crossfield serve``) holds one, else the module eagerly: a water molecule's step is
    ~5x faster through the package on a CPU, and nothing is compiled behind the caller's
    back. ``self.backend`` says which one runs. Compiled backends are checked against eager
    on every head before the first step.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        model: torch.nn.Module | str | Path,
        head: str | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        backend: str = "auto",
        cache_dir: str | Path | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(model, (str, Path)):
            from crossfield.model import load_checkpoint

            model = load_checkpoint(model, map_location=device)
        if head is not None and head not in model.config.head_names:
            heads = model.config.head_names
            raise ValueError(f"head: unknown head {head!r}; this model has heads {heads}")
        current = next(model.parameters())
        if current.dtype != dtype or current.device != torch.device(device):
            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if backend == "auto":
            backend = ready_backend(model, dtype, torch.device(device), cache)
        if backend != "eager":
            model = compile_model(model, backend, dtype, device, cache)
            model.warm_up()
        self.model = model
        self.backend = backend
        self.head = head
        self.dtype = dtype
        self.device = torch.device(device)
        self.stress_wanted = False  # once asked for, stress comes with every evaluation

    def calculate(
        self,
        atoms=None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        properties = properties or ["energy"]
        super().calculate(atoms, properties, system_changes)
        if "stress" in properties:
            if not has_volume(self.atoms):
                raise PropertyNotImplementedError(
                    "stress: defined only for periodic structures with a non-singular cell"
                )
            self.stress_wanted = True
        want_stress = self.stress_wanted and has_volume(self.atoms)
        config = self.model.config
        structure = Structure.from_atoms(self.atoms, head=self.head)
        batch = build_batch(
            [structure],
            config.elements,
            config.r_max,
            config.head_names,
            dtype=self.dtype,
            device=self.device,
        )
        out = self.model(batch, compute_forces=True, compute_stress=want_stress, training=False)
        energy = float(out["energy"].detach()[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().cpu().double().numpy(),
            "energies": out["node_energy"].detach().cpu().double().numpy(),
        }
        if want_stress:
            stress = out["stress"].detach()[0].cpu().double().numpy()
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)


def has_volume(atoms) -> bool:
    """Whether stress is defined: some periodic direction and a cell that spans 3D."""
    return bool(np.any(atoms.pbc)) and abs(float(np.linalg.det(atoms.cell.array))) > 1e-9
