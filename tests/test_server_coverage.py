"""Heads know what they cover: elements outside a head's training data are refused by
symbol, or answered and flagged as an extrapolation when the caller asks for that."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from ase.build import molecule
from server_support import ELEMENTS, running_server, small_model, stub

from crossfield.model import Structure, evaluate
from crossfield.v1 import inference_pb2
from crossfield.v1.messages import compute_request, response_results


@pytest.fixture(scope="module")
def server():
    model = small_model()
    pbe, r2scan, _ = model.config.heads
    pbe.elements, pbe.systems = [1, 6, 8], ["molecule"]  # trained on H, C, O molecules
    r2scan.elements = None  # unknown (as for imported models): refuses nothing
    model.config.heads[2].elements = list(ELEMENTS)
    with running_server({"small": model}) as running:
        yield running, model


def request(atoms, head: str, allow: bool = False):
    return compute_request(
        atoms.numbers, atoms.positions, model="small", head=head, allow_extrapolation=allow
    )


def test_element_outside_the_head_is_refused_by_symbol(server):
    running, _ = server
    with pytest.raises(grpc.RpcError) as caught:
        stub(running).Compute(request(molecule("CH3CN"), "pbe"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = caught.value.details()
    assert "head 'pbe'" in message and "not trained on N " in message
    assert "covers H, C, O" in message and "allow_extrapolation" in message


def test_extrapolation_is_answered_and_flagged_when_allowed(server):
    running, model = server
    atoms = molecule("CH3CN")
    response = stub(running).Compute(request(atoms, "pbe", allow=True), timeout=30)
    assert response.extrapolation and list(response.extrapolated_elements) == [7]
    direct = evaluate(model, [Structure.from_atoms(atoms, head="pbe")], compute_stress=False)[0]
    assert abs(response.energy - float(direct["energy"])) < 1e-8
    np.testing.assert_array_equal(response_results(response)["extrapolated_elements"], [7])


def test_covered_and_unknown_coverage_answer_unflagged(server):
    running, _ = server
    water = stub(running).Compute(request(molecule("H2O"), "pbe"), timeout=30)
    assert not water.extrapolation and not water.extrapolated_elements
    unknown = stub(running).Compute(request(molecule("CH3CN"), "r2scan"), timeout=30)
    assert not unknown.extrapolation


def test_list_models_shows_each_heads_coverage(server):
    running, _ = server
    (info,) = stub(running).ListModels(inference_pb2.ListModelsRequest(), timeout=30).models
    heads = {h.name: h for h in info.heads}
    assert heads["pbe"].coverage_known and list(heads["pbe"].elements) == [1, 6, 8]
    assert list(heads["pbe"].systems) == ["molecule"]
    assert not heads["r2scan"].coverage_known and not heads["r2scan"].elements
    assert list(heads["wb97"].elements) == ELEMENTS


def test_element_outside_the_model_is_named_by_symbol(server):
    running, _ = server
    iron = molecule("H2O")
    iron.numbers[0] = 26
    with pytest.raises(grpc.RpcError) as caught:
        stub(running).Compute(request(iron, "wb97"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "element Fe (26)" in caught.value.details()
