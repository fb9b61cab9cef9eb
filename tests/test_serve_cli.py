"""`sdpipe serve`'s user errors: one line on stderr, exit code 2, no traceback, before the server starts."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdpipe.cli import app as cli_app
from test_serve import make_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("serve_cli") / "model")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*args: str):
    return CliRunner().invoke(cli_app, ["serve", *args])


@pytest.mark.parametrize("port", ["99999", "0", "-1", "65536"])
def test_a_port_out_of_range_is_refused(model: Path, served: list, port: str) -> None:
    result = serve("--model", str(model), "--port", port)
    assert result.exit_code == 2 and not served, result.output
    assert result.output == f"error: --port {port} is not a port: use one from 1 to 65535\n"


def test_a_port_in_use_and_a_foreign_address_are_one_line_errors(model: Path, served: list, busy_port: int) -> None:
    result = serve("--model", str(model), "--port", str(busy_port))
    assert result.exit_code == 2 and not served, result.output
    assert result.output == f"error: cannot listen on 127.0.0.1:{busy_port}: Address already in use\n"
    result = serve("--model", str(model), "--host", "192.0.2.1", "--port", "8000")  # TEST-NET: not this machine's
    assert result.exit_code == 2 and not served, result.output
    assert result.output.startswith("error: cannot listen on 192.0.2.1:8000: ") and result.output.count("\n") == 1
    result = serve("--model", str(model), "--log-level", "loud")
    assert result.exit_code == 2 and "unknown --log-level 'loud'" in result.output


def test_the_checks_pass_and_the_server_starts_on_its_socket(model: Path, served: list) -> None:
    port = free_port()
    result = serve("--model", str(model), "--port", str(port), "--host", "127.0.0.1")
    assert result.exit_code == 0 and len(served) == 1, result.output
    assert served[0].config.port == port and served[0].config.app.state.holder.ready  # loaded before listening


def test_the_real_command_exits_2_without_a_traceback(model: Path, busy_port: int) -> None:
    base = [sys.executable, "-m", "sdpipe.cli", "serve", "--model", str(model)]
    for port in ("99999", str(busy_port)):  # the first ended in an abort (exit 134), the second in a traceback
        done = subprocess.run([*base, "--port", port], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and not done.stdout, done.stderr
