"""The optimisers of ``Relax``: ASE's FIRE and LBFGS, one structure at a time, in numpy.

They follow ``ase.optimize.FIRE`` and ``ase.optimize.LBFGS`` (ASE 3.23-3.29) line by line,
with ASE's defaults, so that a structure relaxed on the server takes the steps it would
take in ASE with the same forces: results compare with ASE's own optimiser to round-off,
not merely to the convergence tolerance. Each works on generalised coordinates ``x`` and
forces ``f`` of shape [m, 3] (atoms, plus three cell rows under a cell filter) and knows
nothing of structures, batches or servers.

Per structure in float64 on the host: the state is tiny and the arithmetic is
microseconds per step, next to milliseconds of model evaluation for the batch; a step
of a hundred structures costs about as much as one Python call each.
"""

from __future__ import annotations

import numpy as np

MAXSTEP = 0.2  # A, ASE's default for both


class Fire:
    """ASE's FIRE (Bitzek et al. 2006) with ASE's default parameters."""

    def __init__(
        self,
        dt: float = 0.1,
        maxstep: float = MAXSTEP,
        dtmax: float = 1.0,
        n_min: int = 5,
        finc: float = 1.1,
        fdec: float = 0.5,
        astart: float = 0.1,
        fa: float = 0.99,
        a: float = 0.1,
    ) -> None:
        self.dt, self.maxstep, self.dtmax = dt, maxstep, dtmax
        self.n_min, self.finc, self.fdec = n_min, finc, fdec
        self.astart, self.fa, self.a = astart, fa, a
        self.velocity: np.ndarray | None = None
        self.n_steps = 0

    def step(self, x: np.ndarray, f: np.ndarray) -> np.ndarray:
        """The next coordinates from ``x`` and the forces ``f`` there."""
        if self.velocity is None:
            self.velocity = np.zeros_like(f)
        else:
            v = self.velocity
            if np.vdot(f, v) > 0.0:
                mixed = f / np.sqrt(np.vdot(f, f)) * np.sqrt(np.vdot(v, v))
                self.velocity = (1.0 - self.a) * v + self.a * mixed
                if self.n_steps > self.n_min:
                    self.dt = min(self.dt * self.finc, self.dtmax)
                    self.a *= self.fa
                self.n_steps += 1
            else:
                self.velocity = np.zeros_like(v)
                self.a = self.astart
                self.dt *= self.fdec
                self.n_steps = 0
        self.velocity = self.velocity + self.dt * f
        dr = self.dt * self.velocity
        norm = np.sqrt(np.vdot(dr, dr))
        if norm > self.maxstep:
            dr = self.maxstep * dr / norm
        return x + dr


class Lbfgs:
    """ASE's LBFGS without line search: a diagonal initial inverse Hessian 1/alpha, the
    last ``memory`` steps, the step scaled so that no row moves more than ``maxstep``."""

    def __init__(self, memory: int = 100, maxstep: float = MAXSTEP, alpha: float = 70.0) -> None:
        self.memory, self.maxstep, self.h0 = memory, maxstep, 1.0 / alpha
        self.iteration = 0
        self.s: list[np.ndarray] = []
        self.y: list[np.ndarray] = []
        self.rho: list[float] = []
        self.x0: np.ndarray | None = None
        self.g0: np.ndarray | None = None

    def step(self, x: np.ndarray, f: np.ndarray) -> np.ndarray:
        """The next coordinates from ``x`` and the forces ``f`` there."""
        g = -f.reshape(-1)
        if self.iteration > 0:
            s = x.reshape(-1) - self.x0
            y = g - self.g0
            self.s.append(s)
            self.y.append(y)
            self.rho.append(1.0 / np.dot(y, s))
            if self.iteration > self.memory:
                del self.s[0], self.y[0], self.rho[0]
        count = min(self.memory, self.iteration)
        a = np.empty(count)
        q = g.copy()
        for i in range(count - 1, -1, -1):
            a[i] = self.rho[i] * np.dot(self.s[i], q)
            q -= a[i] * self.y[i]
        z = self.h0 * q
        for i in range(count):
            b = self.rho[i] * np.dot(self.y[i], z)
            z += self.s[i] * (a[i] - b)
        self.iteration += 1
        dr = -z.reshape(-1, 3)
        longest = np.sqrt((dr**2).sum(axis=1).max())
        if longest >= self.maxstep:
            dr *= self.maxstep / longest
        self.x0, self.g0 = x.reshape(-1).copy(), g
        return x + dr


OPTIMIZERS = {"fire": Fire, "lbfgs": Lbfgs}


def max_force(f: np.ndarray) -> float:
    """ASE's convergence measure: the largest row norm of the generalised forces."""
    return float(np.sqrt((f**2).sum(axis=1).max()))
