"""``crossfield compute`` as a user with their own labelled data runs it: labels kept and
predictions beside them, failures summarised by reason, an interrupted run resumed, the
same numbers offline from a checkpoint, extrapolation on request, and mutual TLS (the
command and ``RemoteCalculator``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from client_support import mixed_structures, running_server, small_model

from crossfield.cli import main
from crossfield.client import RemoteCalculator
from crossfield.client.cli import complete_frames
from crossfield.model import save_checkpoint


@pytest.fixture(scope="module")
def model():
    return small_model(seed=2)


@pytest.fixture(scope="module")
def address(model):
    with running_server(model) as address:
        yield address


def labelled(count: int, seed: int = 5) -> list:
    """Structures carrying reference labels the way users' files do: a calculator's
    energy/forces/stress (extxyz ``energy=`` ...) and mace-torch style ``REF_*`` keys."""
    rng = np.random.default_rng(seed)
    structures = mixed_structures(count, seed=seed)
    for index, atoms in enumerate(structures):
        energy, forces = float(rng.normal()), rng.normal(size=(len(atoms), 3))
        values = {"energy": energy, "forces": forces}
        if atoms.pbc.any():
            values["stress"] = rng.normal(size=6)
        atoms.calc = SinglePointCalculator(atoms, **values)
        atoms.info["REF_energy"] = energy + 1.0
        atoms.arrays["REF_forces"] = forces + 1.0
        atoms.info["config_type"] = f"kind{index % 3}"
    structures[4].numbers[0] = 92  # uranium: not in the model
    return structures


def compute(source: Path, target: Path, *extra: str) -> int:
    return main(["compute", str(source), "--out", str(target), "--no-progress", *extra])


def test_labels_are_kept_and_predictions_written_beside_them(model, address, tmp_path, capsys):
    source, target = tmp_path / "in.extxyz", tmp_path / "out.extxyz"
    ase.io.write(source, labelled(12), format="extxyz")
    assert (
        compute(source, target, "-s", address, "--properties", "energy,forces,stress,energies") == 1
    )
    summary = capsys.readouterr().out
    assert "1 failed" in summary
    assert "1 x INVALID_ARGUMENT:" in summary and "(first: structure 4)" in summary
    before, after = ase.io.read(source, ":"), ase.io.read(target, ":")
    assert len(after) == 12
    for original, written in zip(before, after):
        assert written.get_potential_energy() == original.get_potential_energy()
        np.testing.assert_array_equal(written.get_forces(), original.get_forces())
        assert written.info["REF_energy"] == original.info["REF_energy"]
        np.testing.assert_array_equal(written.arrays["REF_forces"], original.arrays["REF_forces"])
        assert written.info["config_type"] == original.info["config_type"]
        if original.pbc.any():
            np.testing.assert_array_equal(written.get_stress(), original.get_stress())
    ok = [a for a in after if a.info["crossfield_status"] == "OK"]
    assert len(ok) == 11
    for atoms in ok:
        assert atoms.info["crossfield_energy"] != atoms.get_potential_energy()
        assert atoms.arrays["crossfield_forces"].shape == (len(atoms), 3)
        assert atoms.arrays["crossfield_energies"].shape == (len(atoms),)
        assert ("crossfield_stress" in atoms.info) == bool(atoms.pbc.any())
    failed = after[4]
    assert failed.info["crossfield_status"] == "INVALID_ARGUMENT"
    assert "92" in failed.info["crossfield_error"] and "crossfield_energy" not in failed.info

    # another prefix (mace-torch's eval writes MACE_*) over the first output keeps both
    again = tmp_path / "again.extxyz"
    assert compute(target, again, "-s", address, "--prefix", "MACE_") == 1
    twice = ase.io.read(again, ":")[0]
    assert twice.info["MACE_energy"] == pytest.approx(twice.info["crossfield_energy"], rel=1e-12)


def test_resume_continues_an_interrupted_run(address, tmp_path, capsys):
    source, full, cut = tmp_path / "in.extxyz", tmp_path / "full.extxyz", tmp_path / "cut.extxyz"
    ase.io.write(source, mixed_structures(20, seed=3), format="extxyz")
    assert compute(source, full, "-s", address) == 0
    capsys.readouterr()
    lines = full.read_text().splitlines(keepends=True)
    frame_lengths, at = [], 0
    while at < len(lines):
        frame_lengths.append(int(lines[at]) + 2)
        at += frame_lengths[-1]
    kept = sum(frame_lengths[:7])
    cut.write_text("".join(lines[: kept + 3]))  # 7 frames and the start of the 8th
    assert complete_frames(cut) == 7 and cut.read_text() == "".join(lines[:kept])

    cut.write_text("".join(lines[: kept + 3]))
    assert compute(source, cut, "-s", address, "--resume") == 0
    out = capsys.readouterr().out
    assert "13 structures" in out and "after 7 already in" in out
    resumed, expected = ase.io.read(cut, ":"), ase.io.read(full, ":")
    assert len(resumed) == 20
    for got, want in zip(resumed, expected):
        np.testing.assert_allclose(got.positions, want.positions)
        assert got.info["crossfield_energy"] == pytest.approx(want.info["crossfield_energy"])


def test_offline_from_a_checkpoint_matches_the_server(model, address, tmp_path, capsys):
    source = tmp_path / "in.extxyz"
    ase.io.write(source, labelled(9, seed=8), format="extxyz")
    checkpoint = tmp_path / "small.pt"
    save_checkpoint(model, checkpoint)
    remote, local = tmp_path / "remote.extxyz", tmp_path / "local.extxyz"
    properties = ["--properties", "energy,forces,stress", "--head", "r2scan"]
    assert compute(source, remote, "-s", address, *properties) == 1
    assert (
        compute(source, local, "--checkpoint", str(checkpoint), "--batch-size", "4", *properties)
        == 1
    )
    out = capsys.readouterr().out
    assert "1 x INVALID_ARGUMENT" in out
    for got, want in zip(ase.io.read(local, ":"), ase.io.read(remote, ":")):
        assert got.info["crossfield_status"] == want.info["crossfield_status"]
        if want.info["crossfield_status"] != "OK":
            continue
        assert got.info["crossfield_model"] == "small.pt:local:r2scan"
        assert got.info["crossfield_energy"] == pytest.approx(
            want.info["crossfield_energy"], rel=1e-10
        )
        np.testing.assert_allclose(
            got.arrays["crossfield_forces"], want.arrays["crossfield_forces"], atol=1e-8
        )
        if want.pbc.any():
            np.testing.assert_allclose(
                got.info["crossfield_stress"], want.info["crossfield_stress"], atol=1e-10
            )
        else:
            assert "crossfield_stress" not in got.info


def test_usage_errors_name_the_flag(tmp_path, capsys):
    source = tmp_path / "in.extxyz"
    ase.io.write(source, mixed_structures(1), format="extxyz")
    out = str(tmp_path / "o.xyz")
    assert main(["compute", str(source), "--out", out, "--prefix", ""]) == 2
    assert "--prefix: must not be empty" in capsys.readouterr().err
    assert main(["compute", str(source), "--out", out, "--checkpoint", "missing.pt"]) == 2
    assert "--checkpoint: no such file" in capsys.readouterr().err
    assert main(["compute", str(source), "--out", out, "--client-key", str(source)]) == 2
    assert "--client-certificate and --client-key" in capsys.readouterr().err


@pytest.fixture(scope="module")
def covering_server():
    """Head 'pbe' trained on H, C, O only; nitrogen is outside it."""
    model = small_model(seed=2)
    model.config.heads[0].elements = [1, 6, 8]
    with running_server(model) as address:
        yield address


def test_extrapolation_on_request_in_compute_and_calculator(covering_server, tmp_path, capsys):
    source = tmp_path / "in.extxyz"
    ase.io.write(source, [molecule("H2O"), molecule("CH3CN")], format="extxyz")
    refused, allowed = tmp_path / "refused.extxyz", tmp_path / "allowed.extxyz"
    assert compute(source, refused, "-s", covering_server, "--head", "pbe") == 1
    assert "not trained on N" in capsys.readouterr().out
    assert (
        compute(source, allowed, "-s", covering_server, "--head", "pbe", "--allow-extrapolation")
        == 0
    )
    water, nitrile = ase.io.read(allowed, ":")
    assert "crossfield_extrapolated_elements" not in water.info
    assert list(np.atleast_1d(nitrile.info["crossfield_extrapolated_elements"])) == [7]

    atoms = molecule("CH3CN")
    atoms.calc = RemoteCalculator(covering_server, head="pbe", allow_extrapolation=True)
    with pytest.warns(UserWarning, match=r"not trained on elements \[7\]"):
        atoms.get_potential_energy()
    assert atoms.calc.results["extrapolated_elements"] == [7]
    atoms.positions[0] += 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not every step
        atoms.get_forces()
    strict = molecule("CH3CN")
    strict.calc = RemoteCalculator(covering_server, head="pbe")
    with pytest.raises(ValueError, match="not trained on N"):
        strict.get_potential_energy()


def test_mutual_tls_for_compute_and_calculator(tmp_path, capsys):
    from security_support import CertificateAuthority, secure_server
    from server_support import small_model as server_model

    from crossfield.server.security import SecurityConfig

    ca = CertificateAuthority(tmp_path / "pki", "test-ca")
    server_identity, client = ca.issue("server", server=True), ca.issue("client", server=False)
    security = SecurityConfig(
        tls_cert=server_identity.cert, tls_key=server_identity.key, tls_client_ca=ca.identity.cert
    )
    with secure_server(server_model(), security) as server:
        address = f"127.0.0.1:{server.port}"
        atoms = molecule("H2O")
        atoms.calc = RemoteCalculator(
            address,
            root_certificates=ca.pem,
            client_certificate=client.cert_pem,
            client_key=client.key_pem,
            retries=1,
        )
        energy = atoms.get_potential_energy()
        source, target = tmp_path / "in.xyz", tmp_path / "out.xyz"
        ase.io.write(source, molecule("H2O"))
        tls = ["-s", address, "--root-certificates", str(ca.identity.cert)]
        mutual = [*tls, "--client-certificate", str(client.cert), "--client-key", str(client.key)]
        assert compute(source, target, *mutual) == 0
        assert ase.io.read(target).info["crossfield_energy"] == pytest.approx(energy, rel=1e-12)
        capsys.readouterr()
        # no client certificate: the server drops the handshake, which looks like a server
        # that is not up yet; the client waits for it until --timeout, then gives up
        refused = compute(source, tmp_path / "refused.xyz", *tls, "--timeout", "1")
        assert refused == 2
        assert "UNAVAILABLE" in capsys.readouterr().err
