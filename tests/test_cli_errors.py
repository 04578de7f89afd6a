"""What a new user sees when something is off: ``--version``, one clear line and exit
status 2 for a busy port, for a server command in a client-only install and for a training
config of the wrong shape; ``level_of_theory: PBE`` is accepted as written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import yaml
from client_support import running_server, small_model

from crossfield.cli import main
from crossfield.training.config import load_config

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def crossfield(*args: str, prelude: str = "", cwd=None) -> subprocess.CompletedProcess:
    code = prelude + "import sys\nfrom crossfield.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=cwd,
    )


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == "crossfield 0.1.0"


def test_busy_port_is_one_line_and_exit_2() -> None:
    """Busy by a plain listener, and by a Crossfield server (gRPC's SO_REUSEPORT would
    otherwise let a second server share the port silently)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        done = crossfield("serve", "--host", "127.0.0.1", "--port", str(port))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"crossfield serve: --port: port {port} is in use (another server?); "
        "choose another, or 0 for any free port"
    )
    with running_server(small_model()) as address:
        port = address.rsplit(":", 1)[1]
        done = crossfield("serve", "--port", port, "--metrics-port", "-1")
    assert done.returncode == 2 and f"port {port} is in use" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


NO_TORCH = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class ClientOnly(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "e3nn", "vesin", "yaml", "prometheus_client"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, ClientOnly())
    """
)


@pytest.mark.parametrize(
    "args,extra",
    [
        (["serve", "--port", "0"], "server"),
        (["train", "config.yaml"], "train"),
        (["compute", "in.xyz", "--out", "o.xyz", "--checkpoint", "x.pt"], "model"),
    ],
)
def test_server_commands_in_a_client_only_install(tmp_path, args, extra) -> None:
    (tmp_path / "in.xyz").write_text("1\n\nH 0 0 0\n")
    (tmp_path / "x.pt").write_bytes(b"")
    done = crossfield(*args, prelude=NO_TORCH, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()[-1:]
    assert "needs the optional dependency" in line and f"crossfield[{extra}]" in line
    assert "Traceback" not in done.stderr


def write_config(tmp_path, head: dict) -> str:
    data = tmp_path / "train.xyz"
    data.write_text("1\nenergy=-1.0\nH 0 0 0\n")
    head = {"name": "pbe", "train_file": str(data), **head}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"heads": [head]}))
    return str(path)


def test_level_of_theory_as_a_plain_string(tmp_path) -> None:
    config = load_config(write_config(tmp_path, {"level_of_theory": "PBE"}))
    assert config.heads[0].level_of_theory == {"method": "PBE"}
    config = load_config(write_config(tmp_path, {"level_of_theory": {"functional": "PBE"}}))
    assert config.heads[0].level_of_theory == {"functional": "PBE"}


@pytest.mark.parametrize(
    "head,named",
    [
        ({"level_of_theory": ["PBE", "D3"]}, "heads[0].level_of_theory: expected a mapping"),
        ({"keys": "REF_energy"}, "heads[0].keys: expected a mapping"),
        ({"loss_weight": "heavy"}, "heads[0].loss_weight: expected a number"),
    ],
)
def test_wrongly_shaped_config_is_one_line_exit_2(tmp_path, capsys, head, named) -> None:
    assert main(["train", write_config(tmp_path, head)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crossfield train: ") and named in err and "\n" not in err
