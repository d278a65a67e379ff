"""``transformers serve`` (transformers' own OpenAI-compatible server) as a context manager, on 127.0.0.1,
pinned to one model folder: the server the openai engine's tests and benchmark talk to.

It needs ``transformers[serving]`` (FastAPI, uvicorn) and accelerate.  It generates one request at a time
for vision models, so it is for tests and small runs, not for speed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TransformersServe:
    """``with TransformersServe(folder) as server: server.base_url`` (``http://127.0.0.1:PORT/v1``)."""

    def __init__(self, model: str | Path, port: int | None = None, device: str = "cpu", startup_s: float = 240):
        self.model, self.port = str(model), port or free_port()
        self.device, self.startup_s = device, startup_s
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        found = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
        if not found:
            raise RuntimeError("the transformers command is not installed: pip install 'transformers[serving]'")
        return [found, "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port), "--device", self.device]

    def __enter__(self) -> "TransformersServe":
        import httpx

        self.log = Path(tempfile.mkstemp(prefix="transformers-serve-", suffix=".log")[1])
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
        deadline = time.monotonic() + self.startup_s
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"transformers serve exited: {self.log.read_text()[-2000:]}")
                try:
                    if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2, trust_env=False).is_success:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"transformers serve did not answer in {self.startup_s:.0f} s: "
                                       f"{self.log.read_text()[-2000:]}")
                time.sleep(0.5)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.unlink(missing_ok=True)
