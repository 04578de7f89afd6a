"""Evaluate structures in this process from a checkpoint: ``crossfield compute --checkpoint``.

Yields the same ``Result`` objects a server's answers become, so the command writes one
output format with or without a server, and a parity check needs no server at all.
torch and ``crossfield.model`` are imported only when this runs: the client package
stays torch-free for machines that only talk to servers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from crossfield.client.errors import error_for
from crossfield.client.results import Result, has_volume


def compute_offline(
    checkpoint: Path,
    structures: Iterable,
    properties: Sequence[str],
    *,
    head: str = "",
    dtype: str = "float64",
    batch_size: int = 32,
) -> Iterator[Result]:
    """Results for ``structures`` (ASE Atoms) from the model in ``checkpoint``, in order.

    Structures are evaluated ``batch_size`` at a time; a batch that fails is retried one
    structure at a time, so one bad structure (an element the model does not know) fails
    alone with its reason, as it would on a server.
    """
    import torch

    from crossfield.model.loading import load_model_file

    model = load_model_file(checkpoint, dtype=getattr(torch, dtype))
    heads = model.config.head_names
    if head and head not in heads:
        raise ValueError(f"--head: unknown head {head!r}; this model has heads {heads}")
    answering = head or heads[0]
    batch: list[tuple[int, object]] = []
    for index, atoms in enumerate(structures):
        batch.append((index, atoms))
        if len(batch) == batch_size:
            yield from _evaluate_batch(model, batch, properties, answering, checkpoint.name)
            batch = []
    if batch:
        yield from _evaluate_batch(model, batch, properties, answering, checkpoint.name)


def _evaluate_batch(model, batch, properties, head: str, name: str) -> list[Result]:
    from crossfield.model import Structure, evaluate

    structures = [Structure.from_atoms(atoms, head=head) for _, atoms in batch]
    want_stress = "stress" in properties and any(has_volume(a) for _, a in batch)
    try:
        values = evaluate(model, structures, compute_stress=want_stress)
    except ValueError as err:
        if len(batch) == 1:
            error = error_for("INVALID_ARGUMENT", str(err))
            return [Result(index=batch[0][0], model=name, head=head, error=error)]
        return [r for item in batch for r in _evaluate_batch(model, [item], properties, head, name)]
    results = []
    for (index, atoms), value in zip(batch, values):
        stress = value.get("stress") if has_volume(atoms) and "stress" in properties else None
        results.append(
            Result(
                index=index,
                energy=float(value["energy"]) if "energy" in properties else None,
                forces=value["forces"] if "forces" in properties else None,
                stress=stress,
                energies=value["node_energy"] if "energies" in properties else None,
                model=name,
                version="local",
                head=head,
            )
        )
    return results
