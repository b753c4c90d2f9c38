"""Inference without network: files from the hub cache, or one clear error at once.

Each case runs the real command in a fresh interpreter, because huggingface_hub reads
HF_ENDPOINT / HF_HOME when it is imported. The "hub" is a local TCP server that records the
requests made to it and answers 503 (unavailable, a status huggingface_hub retries with
back-off), so a retry would show as a second request for the file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PARITY
from tests.helpers import PROMPT_TEXT, TEXT, make_model_dir, write_prompt_wav

REPO = Path(__file__).resolve().parents[1]
VOCOS_REPO = "charactr/vocos-mel-24khz"


class CountingServer:
    """Accepts TCP connections on 127.0.0.1, records each request line, answers 503 and
    closes the connection."""

    REPLY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.requests: list[str] = []  # request lines, e.g. "HEAD /repo/resolve/main/file"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                try:
                    conn.settimeout(2)
                    request = conn.recv(65536).decode("latin-1")  # HEAD or GET, no body
                    self.requests.append(" ".join(request.split(" ")[:2]))
                    conn.sendall(self.REPLY)
                except OSError:
                    pass

    def file_requests(self, filename: str) -> list[str]:
        """Requests for a hub file (huggingface_hub also fetches other things, e.g. the
        user-agent registry, which do not count as asking for the file)."""
        return [line for line in self.requests if f"/resolve/main/{filename}" in line]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def hub() -> Iterator[CountingServer]:
    server = CountingServer()
    yield server
    server.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_infer(
    tmp_path: Path, endpoint: str, *extra: str, **env: str
) -> subprocess.CompletedProcess:
    model_dir = tmp_path / "model"
    if not model_dir.exists():
        make_model_dir(model_dir, "zipvoice")
        write_prompt_wav(tmp_path / "prompt.wav")
    environment = {
        **{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"},
        "PYTHONPATH": str(REPO),
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    command = [
        sys.executable, "-m", "zipvoice.bin.infer_zipvoice",
        "--model-dir", str(model_dir),
        "--tokenizer", "simple",
        "--prompt-wav", str(tmp_path / "prompt.wav"),
        "--prompt-text", PROMPT_TEXT,
        "--text", TEXT,
        "--num-step", "2",
        "--res-wav-path", str(tmp_path / "out.wav"),
        *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_unreachable_hub_fails_at_once_naming_the_file_and_the_alternatives(tmp_path, hub):
    result = run_infer(tmp_path, hub.url)
    assert result.returncode == 1, result.stderr
    lines = _error_lines(result)
    assert len(lines) == 1, lines  # no traceback, no repeated warnings
    message = lines[0]
    assert message.startswith(f"error: cannot download config.yaml of {VOCOS_REPO}")
    assert "--vocoder-path" in message and "griffin-lim" in message
    assert len(hub.file_requests("config.yaml")) == 1, hub.requests  # asked once: no retries
    assert not hub.file_requests("pytorch_model.bin")
    assert not (tmp_path / "out.wav").exists()


def test_closed_port_gives_the_same_single_line(tmp_path):
    result = run_infer(tmp_path, f"http://127.0.0.1:{_closed_port()}")
    assert result.returncode == 1
    lines = _error_lines(result)
    assert len(lines) == 1 and "cannot download config.yaml" in lines[0], lines
    assert "Retrying" not in result.stderr


def test_hf_hub_offline_never_connects(tmp_path, hub):
    result = run_infer(tmp_path, hub.url, HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert "HF_HUB_OFFLINE is set" in result.stderr and "griffin-lim" in result.stderr
    assert not hub.file_requests(""), hub.requests


def test_cached_files_are_used_without_network(tmp_path, hub):
    # The hub cache layout huggingface_hub itself writes: snapshots/<commit>/ + refs/main.
    commit = "0" * 40
    repo_dir = tmp_path / "hf_home" / "hub" / f"models--{VOCOS_REPO.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.yaml", "pytorch_model.bin"):
        shutil.copyfile(PARITY / "vocos" / name, snapshot / name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    result = run_infer(tmp_path, hub.url)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.wav").stat().st_size > 1000
    assert not hub.file_requests(""), hub.requests


def test_griffin_lim_needs_no_hub(tmp_path, hub):
    result = run_infer(tmp_path, hub.url, "--vocoder-path", "griffin-lim")
    assert result.returncode == 0, result.stderr
    assert not hub.file_requests(""), hub.requests


def test_missing_model_files_name_the_model_dir_layout(tmp_path, hub):
    from zipvoice.models.loader import resolve_model_dir

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    code = "from zipvoice.models.loader import resolve_model_dir as r; r('zipvoice')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "HubUnavailableError: cannot download zipvoice/model.pt of k2-fsa/ZipVoice" in last
    assert "--model-dir" in last and "model.json" in last and "tokens.txt" in last
    assert len(hub.file_requests("zipvoice/model.pt")) == 1, hub.requests
    assert resolve_model_dir  # imported here too: the module loads without network


def test_recipe_download_folder_offline(tmp_path, monkeypatch):
    """The recipe downloads into download/ (local_dir): offline, a missing file is named with
    where to put it; a file placed there by hand is used as it is."""
    from zipvoice.utils.hub import HubUnavailableError, hub_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = tmp_path / "download"
    with pytest.raises(HubUnavailableError, match=r"zipvoice/tokens.txt .*HF_HUB_OFFLINE.*put it"):
        hub_file("k2-fsa/ZipVoice", "zipvoice/tokens.txt", instead="put it there", local_dir=dest)
    (dest / "zipvoice").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PARITY / "tokens.txt", dest / "zipvoice" / "tokens.txt")
    found = hub_file("k2-fsa/ZipVoice", "zipvoice/tokens.txt", instead="-", local_dir=dest)
    assert found == dest / "zipvoice" / "tokens.txt"
