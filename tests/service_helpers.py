"""Helpers for the service tests: a tiny model with a real tokenizer, app settings, a real uvicorn subprocess."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from transformers import LlamaConfig

from model import ArmtConfig, ArmtModel
from model.text import EOS, train_tokenizer

SEGMENT = 16
REPO = Path(__file__).resolve().parents[1]


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def build_tiny_model(directory: Path, seed: int = 0, act: bool = False) -> Path:
    """2 layers, hidden 32, segments of 16 + 4 memory tokens, a ~300-token byte-level BPE; W_mv random so that
    the memory changes the answers (the research init of zero would leave it unused). `act`: with ACT layers."""
    tok = train_tokenizer(corpus()[:40], vocab_size=300)
    eos = tok.token_to_id(EOS)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=eos,
                      bos_token_id=eos, tie_word_embeddings=False)
    model = ArmtModel.from_config(cfg, ArmtConfig(num_mem_tokens=4, d_mem=8, segment_size=SEGMENT, act=act),
                                  seed=seed)
    with torch.no_grad():
        model.W_mv.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
        model.base.hf.lm_head.weight[eos].zero_()  # keeps greedy answers from ending at once (tests want length)
    model.tokenizer = tok
    model.save_pretrained(directory)
    return directory


def document(n_chars: int = 6000) -> str:
    """Real prose with multi-byte characters sprinkled in (cuts inside them are part of the tests)."""
    text = "\n\n".join(corpus()[40:60])
    extra = " Zoë’s café — naïve façade, 東京 and Ελλάδα, emoji 🙂🚀. "
    out, i = [], 0
    while sum(map(len, out)) < n_chars:
        out.append(text[i : i + 400] + extra)
        i += 400
    return "".join(out)[:n_chars]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`armt serve` in a subprocess on 127.0.0.1 and a random free port."""

    def __init__(self, model_dir: Path, data_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "ARMT_DATA_DIR": str(data_dir), "ARMT_LOG_LEVEL": "warning",
                    "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
        self.cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), "--model",
                    str(model_dir)]
        self.log = Path(data_dir).with_name(Path(data_dir).name + "-server.log")  # a file: a pipe could fill up
        self.proc: subprocess.Popen | None = None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def spawn(self, **popen) -> subprocess.Popen:
        with open(self.log, "ab") as log:
            return subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=log, stderr=log, **popen)

    def start(self, timeout: float = 60.0) -> "Server":
        self.proc = self.spawn()
        return self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, like a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer:
    """A real `redis-server` (Debian package redis-server; .ci/run installs it) on 127.0.0.1 and a free port, its
    files in `directory`, no persistence: the shared session store of the scale-out tests."""

    def __init__(self, directory: Path) -> None:
        self.dir, self.port = Path(directory), free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:  # not a skip: CI installs it, and a silent skip would hide the scale-out tests
            raise RuntimeError("redis-server not found: `apt-get install redis-server` (.ci/run does it)")
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
               "--appendonly", "no", "--databases", "64", "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}")
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not answer PING")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
