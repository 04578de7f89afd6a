"""Which elements a head answers for, and what a request outside them gets.

All heads share one element table, so a head can be asked about an element that its
level of theory never saw in training: its E0 for that element is 0 and its answer is an
extrapolation of the shared backbone, with nothing to tell the caller. A head's coverage
(``HeadConfig.elements``, recorded by training) turns that into a clear refusal, or, when
the caller explicitly allows it, into an answer flagged as an extrapolation. Heads of
imported models do not know their coverage and refuse nothing.
"""

from __future__ import annotations

import ase.data
import numpy as np

from crossfield.model import ModelConfig

from .errors import InvalidArgumentError


def symbols(numbers) -> str:
    """``Fe, Co`` for atomic numbers (what error messages show, with the numbers)."""
    return ", ".join(f"{ase.data.chemical_symbols[int(z)]}" for z in numbers)


def uncovered_elements(config: ModelConfig, head: str, numbers: np.ndarray) -> list[int]:
    """The elements of ``numbers`` outside ``head``'s training data ([] when unknown)."""
    covered = config.heads[config.head_index(head)].elements
    if covered is None:
        return []
    return [int(z) for z in np.setdiff1d(numbers, covered)]


def check_coverage(
    config: ModelConfig, model_name: str, head: str, numbers: np.ndarray, allow: bool
) -> tuple[int, ...]:
    """The extrapolated elements (allowed), or INVALID_ARGUMENT naming them and the head."""
    outside = uncovered_elements(config, head, numbers)
    if outside and not allow:
        covered = config.heads[config.head_index(head)].elements or []
        raise InvalidArgumentError(
            f"structure.numbers: head {head!r} of model {model_name!r} was not trained on "
            f"{symbols(outside)} (it covers {symbols(covered)}); choose a head that covers "
            "them (ListModels), or set allow_extrapolation for an answer flagged as an "
            "extrapolation"
        )
    return tuple(outside)
