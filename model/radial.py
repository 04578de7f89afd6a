"""Radial features of an edge: Bessel basis, polynomial envelope, Agnesi transform, ZBL.

Constants that enter the numbers (Bessel frequencies, transform and ZBL parameters,
covalent radii) are buffers, not Python floats: a model created in float32 and converted
to float64 keeps the float32-rounded constants it was trained with, and an imported
mace-torch model brings its own values (SCIENCE.md section 2).
"""

from __future__ import annotations

import math

import ase.data
import torch


class BesselBasis(torch.nn.Module):
    """``B_n(r) = sqrt(2 / r_max) sin(n pi r / r_max) / r``, n = 1..N."""

    def __init__(self, r_max: float, num_basis: int) -> None:
        super().__init__()
        frequencies = math.pi / r_max * torch.linspace(1.0, num_basis, num_basis)
        self.register_buffer("frequencies", frequencies)
        self.register_buffer("prefactor", torch.tensor(math.sqrt(2.0 / r_max)))

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # [E, 1] -> [E, N]
        return self.prefactor * torch.sin(self.frequencies * r) / r


def polynomial_envelope(r: torch.Tensor, r_max: torch.Tensor, p: int) -> torch.Tensor:
    """Smooth cutoff: 1 at r = 0, zero with p continuous derivatives at r_max, 0 beyond."""
    x = r / r_max
    envelope = (
        1.0
        - ((p + 1.0) * (p + 2.0) / 2.0) * torch.pow(x, p)
        + p * (p + 2.0) * torch.pow(x, p + 1)
        - (p * (p + 1.0) / 2.0) * torch.pow(x, p + 2)
    )
    return envelope * (r < r_max)


class PolynomialCutoff(torch.nn.Module):
    def __init__(self, r_max: float, p: int) -> None:
        super().__init__()
        self.p = int(p)
        self.register_buffer("r_max", torch.tensor(float(r_max)))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return polynomial_envelope(r, self.r_max, self.p)


def _covalent_radii() -> torch.Tensor:
    return torch.tensor(ase.data.covalent_radii, dtype=torch.get_default_dtype())


class AgnesiTransform(torch.nn.Module):
    """``r~ = 1 / (1 + a (r/r0)^q / (1 + (r/r0)^(q-p)))`` with r0 the mean covalent radius.

    Stretches short distances where repulsion varies fastest (ACEpotentials.jl, 2023);
    applied to the Bessel argument only, never to the cutoff envelope.
    """

    def __init__(self, q: float = 0.9183, p: float = 4.5791, a: float = 1.0805) -> None:
        super().__init__()
        self.register_buffer("q", torch.tensor(q))
        self.register_buffer("p", torch.tensor(p))
        self.register_buffer("a", torch.tensor(a))
        self.register_buffer("covalent_radii", _covalent_radii())

    def forward(
        self, r: torch.Tensor, z_sender: torch.Tensor, z_receiver: torch.Tensor
    ) -> torch.Tensor:
        r0 = 0.5 * (self.covalent_radii[z_sender] + self.covalent_radii[z_receiver]).unsqueeze(-1)
        x = r / r0
        return (
            1 + self.a * torch.pow(x, self.q) / (1 + torch.pow(x, self.q - self.p))
        ).reciprocal()


class ZBLRepulsion(torch.nn.Module):
    """Universal ZBL screened nuclear repulsion, switched off at the sum of covalent radii.

    Returns per-atom energies (half of each pair on its receiver) in eV. The switch is
    the polynomial envelope at the covalent radii sum, capped at ``r_max`` when given.
    """

    def __init__(self, p: int, r_max: float | None = None) -> None:
        super().__init__()
        self.p = int(p)
        # None: switch at the covalent radii sum even beyond the cutoff (mace-torch, whose
        # pairs with a larger sum than r_max then jump); otherwise the switch radius is
        # capped at the model's cutoff so every pair vanishes smoothly there.
        self.r_max = r_max
        self.register_buffer("coefficients", torch.tensor([0.1818, 0.5099, 0.2802, 0.02817]))
        self.register_buffer("exponents", torch.tensor([3.2, 0.9423, 0.4028, 0.2016]))
        self.register_buffer("a_exp", torch.tensor(0.300))
        self.register_buffer("a_prefactor", torch.tensor(0.4543))
        self.register_buffer("covalent_radii", _covalent_radii())

    def forward(
        self,
        r: torch.Tensor,  # [E, 1]
        z_sender: torch.Tensor,
        z_receiver: torch.Tensor,
        receiver: torch.Tensor,
        num_atoms: int,
    ) -> torch.Tensor:
        z_u = z_sender.unsqueeze(-1)
        z_v = z_receiver.unsqueeze(-1)
        screening = (
            self.a_prefactor * 0.529 / (torch.pow(z_u, self.a_exp) + torch.pow(z_v, self.a_exp))
        )
        x = r / screening
        phi = sum(c * torch.exp(-e * x) for c, e in zip(self.coefficients, self.exponents))
        pair = 14.3996 * z_u * z_v / r * phi
        r_switch = self.covalent_radii[z_u] + self.covalent_radii[z_v]
        if self.r_max is not None:
            r_switch = r_switch.clamp(max=self.r_max)
        pair = 0.5 * pair * polynomial_envelope(r, r_switch, self.p)
        out = torch.zeros(num_atoms, 1, dtype=r.dtype, device=r.device)
        return out.index_add_(0, receiver, pair).squeeze(-1)


class RadialEmbedding(torch.nn.Module):
    """Edge features for the radial networks, and the envelope for their outputs.

    With ``apply_cutoff`` the envelope multiplies the Bessel features here; the envelope
    is returned either way, and the model decides which blocks multiply their radial
    network outputs by it (``CrossfieldMACE.output_envelopes``).
    """

    def __init__(
        self,
        r_max: float,
        num_bessel: int,
        cutoff_p: int,
        distance_transform: str,
        apply_cutoff: bool,
    ) -> None:
        super().__init__()
        self.bessel = BesselBasis(r_max, num_bessel)
        self.cutoff = PolynomialCutoff(r_max, cutoff_p)
        self.transform = AgnesiTransform() if distance_transform == "agnesi" else None
        self.apply_cutoff = apply_cutoff
        self.out_dim = num_bessel

    def forward(
        self, r: torch.Tensor, z_sender: torch.Tensor, z_receiver: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        envelope = self.cutoff(r)
        if self.transform is not None:
            r = self.transform(r, z_sender, z_receiver)
        features = self.bessel(r)
        if self.apply_cutoff:
            features = features * envelope
        return features, envelope
