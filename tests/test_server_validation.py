"""Every bad input gets its status code and a message naming the field, on a real server;
bad structures never fail their batch-mates and never stop the server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from server_support import (
    nan_for_element,
    request_for,
    runner_held,
    running_server,
    scrape,
    small_model,
    stub,
    wait_queued,
)

from crossfield.model import Structure, evaluate
from crossfield.v1 import inference_pb2
from crossfield.v1.arrays import to_array

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def server(model):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with running_server({"small": model}, max_atoms_per_structure=100) as running:
        yield running
    torch.set_num_threads(previous)


def water() -> inference_pb2.ComputeRequest:
    return request_for(Structure.from_atoms(molecule("H2O")), id="w")


def silicon() -> inference_pb2.ComputeRequest:
    return request_for(Structure.from_atoms(bulk("Si", "diamond", a=5.43)), ("energy", "stress"))


def edit(request: inference_pb2.ComputeRequest, change) -> inference_pb2.ComputeRequest:
    change(request)
    return request


def set_array(field: str, values, dtype: str | None = None):
    return lambda r: getattr(r.structure, field).CopyFrom(to_array(values, dtype))


BAD_REQUESTS = {
    "unknown model": (edit(water(), lambda r: setattr(r, "model", "nope")), NOT_FOUND, "model:"),
    "unknown version": (edit(water(), lambda r: setattr(r, "version", "9")), NOT_FOUND, "version:"),
    "unknown head": (edit(water(), lambda r: setattr(r, "head", "hf")), NOT_FOUND, "head:"),
    "element outside table": (
        edit(water(), set_array("numbers", [8, 1, 92], "int32")),
        INVALID,
        "structure.numbers: element U (92)",
    ),
    "atomic number 0": (
        edit(water(), set_array("numbers", [8, 1, 0], "int32")),
        INVALID,
        "element unknown (0)",
    ),
    "float atomic numbers": (
        edit(water(), set_array("numbers", [8.0, 1.0, 1.0])),
        INVALID,
        "structure.numbers: must be INT32",
    ),
    "empty structure": (
        edit(
            water(),
            lambda r: (
                set_array("numbers", np.zeros(0), "int32")(r),
                set_array("positions", np.zeros((0, 3)))(r),
            ),
        ),
        INVALID,
        "structure.numbers: empty",
    ),
    "too many atoms": (
        edit(
            water(),
            lambda r: (
                set_array("numbers", np.ones(101), "int32")(r),
                set_array("positions", np.arange(303.0).reshape(101, 3))(r),
            ),
        ),
        INVALID,
        "101 atoms exceed the limit of 100",
    ),
    "NaN position": (
        edit(water(), set_array("positions", [[0, 0, 0], [0, 0, 1], [np.nan, 0, 0]])),
        INVALID,
        "structure.positions: contains NaN",
    ),
    "infinite position": (
        edit(water(), set_array("positions", [[0, 0, 0], [0, 0, 1], [np.inf, 0, 0]])),
        INVALID,
        "structure.positions: contains NaN or infinite",
    ),
    "two atoms on one spot": (
        edit(water(), set_array("positions", [[0, 0, 0], [0.9, 0.2, 0], [0, 0, 0]])),
        INVALID,
        "structure.positions: atoms 0 and 2 are at the same position",
    ),
    "positions [n, 2]": (
        edit(water(), set_array("positions", np.zeros((3, 2)))),
        INVALID,
        "structure.positions: shape [3, 2]",
    ),
    "positions for 2 of 3 atoms": (
        edit(water(), set_array("positions", np.zeros((2, 3)))),
        INVALID,
        "structure.positions: shape [2, 3]",
    ),
    "positions bytes do not match shape": (
        edit(water(), lambda r: r.structure.positions.shape.__setitem__(0, 4)),
        INVALID,
        "structure.positions.data",
    ),
    "positions without dtype": (
        edit(water(), lambda r: setattr(r.structure.positions, "dtype", 0)),
        INVALID,
        "structure.positions.dtype",
    ),
    "missing positions": (
        edit(water(), lambda r: r.structure.ClearField("positions")),
        INVALID,
        "structure.positions: missing",
    ),
    "missing structure": (
        edit(water(), lambda r: r.ClearField("structure")),
        INVALID,
        "structure: missing",
    ),
    "singular cell with pbc": (
        edit(silicon(), set_array("cell", [[5, 0, 0], [5, 0, 0], [0, 0, 5]], "float64")),
        INVALID,
        "structure.cell: the periodic lattice vectors",
    ),
    "zero cell with pbc": (
        edit(silicon(), set_array("cell", np.zeros((3, 3)))),
        INVALID,
        "singular",
    ),
    "pbc without cell": (
        edit(silicon(), lambda r: r.structure.ClearField("cell")),
        INVALID,
        "structure.cell: missing",
    ),
    "cell [2, 3]": (
        edit(silicon(), set_array("cell", np.eye(3)[:2] * 5)),
        INVALID,
        "structure.cell: must have shape",
    ),
    "cell in nanometres": (
        edit(silicon(), set_array("cell", np.eye(3) * 0.3)),
        INVALID,
        "neighbours per atom",
    ),
    "two pbc flags": (edit(silicon(), lambda r: r.structure.pbc.pop()), INVALID, "structure.pbc"),
    "stress of a molecule": (
        edit(water(), lambda r: r.properties.append(inference_pb2.PROPERTY_STRESS)),
        INVALID,
        "properties: stress needs a periodic",
    ),
    "unknown property": (
        edit(water(), lambda r: r.properties.append(42)),
        INVALID,
        "properties: unknown",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_its_status_code(server, case: str) -> None:
    request, code, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as raised:
        stub(server).Compute(request, timeout=30)
    assert raised.value.code() == code, raised.value.details()
    assert message in raised.value.details()


def test_bad_items_of_a_stream_get_statuses_and_the_stream_goes_on(server) -> None:
    cases = list(BAD_REQUESTS)
    requests = []
    for index, case in enumerate(cases):
        request = inference_pb2.ComputeRequest()
        request.CopyFrom(BAD_REQUESTS[case][0])
        request.id = f"bad{index}"
        requests += [request, edit(water(), lambda r, i=index: setattr(r, "id", f"good{i}"))]
    responses = {r.id: r for r in stub(server).ComputeStream(iter(requests), timeout=60)}
    assert len(responses) == len(requests)
    for index, case in enumerate(cases):
        _, code, message = BAD_REQUESTS[case]
        bad = responses[f"bad{index}"]
        assert bad.status.code == code.value[0] and message in bad.status.message, case
        good = responses[f"good{index}"]
        assert good.status.code == 0 and good.HasField("energy")


def test_a_structure_that_breaks_the_model_fails_alone() -> None:
    """A structure whose results are not finite (here a model that gives NaN for silicon:
    validation refuses the inputs that would do it to a real model, such as two atoms on
    one spot) fails alone; its batch-mates, evaluated in the same batch, still get exact
    answers."""
    model = nan_for_element(small_model(), 14)
    good = [
        Structure.from_atoms(molecule(name), head=head)
        for name, head in (("CH4", "pbe"), ("NH3", "r2scan"), ("H2O", "wb97"))
    ]
    culprit = Structure.from_atoms(molecule("SiH4"), head="pbe")
    requests = [request_for(s, id=f"good{i}") for i, s in enumerate(good)]
    requests.insert(1, request_for(culprit, id="culprit"))
    with running_server({"small": model}, max_delay=0.5) as server:
        with runner_held(server):  # all four in one batch
            call = stub(server).ComputeStream(iter(requests), timeout=60)
            wait_queued(server, len(requests))
        responses = {r.id: r for r in call}
        after = stub(server).Compute(request_for(good[0]), timeout=30)  # still serving
        metrics = scrape(server)
    small = frozenset({("model", "small")})
    assert (
        metrics[("crossfield_batch_structures_count", small)] == 2
    )  # the stream's batch + 'after'
    assert responses["culprit"].status.code == INVALID.value[0]
    assert (
        "structure.positions: the model gave non-finite results"
        in responses["culprit"].status.message
    )
    for index, structure in enumerate(good):
        reference = evaluate(model, [structure])[0]
        np.testing.assert_allclose(
            responses[f"good{index}"].energy, reference["energy"], rtol=1e-10
        )
    assert after.HasField("energy")
