"""The vLLM command line the gateway, `promptintern vllm`, tests and benchmarks share (no vLLM started)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from core.config import Settings
from gateway.cli import build_parser, main, vllm_extra_args
from gateway.vllm_server import VLLM_LORA_RANKS, vllm_command


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_command_serves_lora_with_the_configured_rank_and_caching() -> None:
    command = vllm_command(Settings(max_lora_rank=8), Path("/models/base"), python=Path("/venv/bin/python"),
                           port=8123, max_loras=3, prefix_caching=False)
    assert command[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-lora" in command and "--no-enable-prefix-caching" in command
    assert _flag(command, "--max-lora-rank") == "8" and _flag(command, "--max-loras") == "3"
    assert _flag(command, "--port") == "8123" and _flag(command, "--model") == "/models/base"
    assert "--enforce-eager" not in command
    assert "--enforce-eager" in vllm_command(Settings(), Path("/m"), fast_start=True)


def test_lora_is_applied_to_the_configured_modules_only() -> None:
    """vLLM's own default wraps every linear layer, the embeddings and lm_head (bench levers: +175% per token
    against +128% on the attention projections alone); the launcher names the trainer's targets."""
    command = vllm_command(Settings(), Path("/m"))
    start = command.index("--lora-target-modules") + 1
    assert command[start:start + 5] == ["q_proj", "k_proj", "v_proj", "o_proj", "--max-model-len"]
    assert "--lora-target-modules" not in vllm_command(Settings(vllm_lora_target_modules=[]), Path("/m"))
    assert "--lora-target-modules" not in vllm_command(Settings(), Path("/m"), lora=False)  # a merged model


def test_trained_adapters_must_fit_the_vllm_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTINTERN_VLLM_LORA_TARGET_MODULES", "q_proj, v_proj")
    assert Settings().vllm_lora_target_modules == ["q_proj", "v_proj"]
    assert Settings(lora_targets=["q_proj", "v_proj"], engine="vllm").engine == "vllm"
    assert Settings().engine == "embedded"  # the embedded engine (peft) adapts any module
    with pytest.raises(ValueError, match="LORA_TARGETS names k_proj, o_proj, which VLLM_LORA_TARGET_MODULES"):
        Settings(engine="vllm")
    monkeypatch.setenv("PROMPTINTERN_VLLM_LORA_TARGET_MODULES", "")
    assert Settings(engine="vllm").vllm_lora_target_modules == []  # every module


def test_arguments_after_a_double_dash_go_to_vllm_as_given() -> None:
    args = build_parser().parse_args(["vllm", "--fast-start", "--", "--enable-auto-tool-choice",
                                      "--tool-call-parser", "hermes"])
    extra = vllm_extra_args(args.vllm_args)
    assert extra == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    command = vllm_command(Settings(), Path("/m"), fast_start=args.fast_start, extra_args=extra)
    assert command[-3:] == extra and "--enforce-eager" in command
    assert vllm_extra_args(build_parser().parse_args(["vllm"]).vllm_args) == []


@pytest.mark.parametrize("rank", [2, 12, 48])
def test_a_rank_vllm_does_not_accept_is_refused_before_start(rank: int) -> None:
    assert rank not in VLLM_LORA_RANKS
    with pytest.raises(ValueError, match=f"MAX_LORA_RANK={rank} is not a rank vLLM accepts"):
        vllm_command(Settings(max_lora_rank=rank), Path("/m"))


def test_promptintern_vllm_reports_a_bad_rank_and_exits_2(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PROMPTINTERN_MAX_LORA_RANK", "12")
    monkeypatch.setenv("PROMPTINTERN_BASE_MODEL", str(tiny_model_path))
    with pytest.raises(SystemExit) as exit_:
        main(["vllm", "--python", sys.executable])
    assert exit_.value.code == 2
    assert "MAX_LORA_RANK=12 is not a rank vLLM accepts" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["interrupted", "timed out"])
def test_a_start_that_does_not_finish_leaves_no_process(how: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while vLLM loads (or a start timeout) stops it: it runs in a session of its own, so nothing else would,
    and `with VLLMProcess(...)` does not call __exit__ when __enter__ raises."""
    import httpx

    from gateway.local_server import free_port
    from gateway.vllm_server import VLLMProcess

    process = VLLMProcess(Settings(), Path("/m"), port=free_port(), log_path=tmp_path / "vllm.log",
                          start_timeout=0.5 if how == "timed out" else 60)
    process.command = [sys.executable, "-c", "import time; time.sleep(600)"]  # never answers /health
    if how == "interrupted":  # Ctrl-C arrives while it polls /health (not in time.sleep: Popen.wait uses it)
        def interrupt(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt
        monkeypatch.setattr(httpx, "get", interrupt)
    with pytest.raises(KeyboardInterrupt if how == "interrupted" else RuntimeError), process:
        pytest.fail("vLLM cannot be ready")
    assert process.process is not None and process.process.poll() is not None  # stopped, not left running


PARENT = """
import sys, time
from pathlib import Path
from gateway.vllm_server import VLLMProcess, spawn_vllm
from core.config import Settings

child = [sys.executable, "-c", "import time; time.sleep(600)"]
if sys.argv[1] == "merged":  # the merged engine's launcher, from the event loop's executor as the gateway calls it
    import asyncio

    async def serve() -> None:  # the loop (and its executor thread, the child's parent) live on, as a gateway's
        print((await asyncio.to_thread(spawn_vllm, child, None, Path(sys.argv[2]))).pid, flush=True)
        await asyncio.sleep(600)

    asyncio.run(serve())
else:  # tests' and benchmarks' VLLMProcess, killed while vLLM loads
    process = VLLMProcess(Settings(), Path("/m"), port=int(sys.argv[3]), log_path=Path(sys.argv[2]))
    process.command = child
    import threading
    threading.Thread(target=process.start, daemon=True).start()
    while process.process is None:
        time.sleep(0.05)
    print(process.process.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # exited, not yet reaped by init


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("launcher", ["merged", "process"])
def test_vllm_stops_when_the_process_that_started_it_is_killed(launcher: str, tmp_path: Path) -> None:
    """A gateway killed with SIGKILL (OOM killer, a crash) takes its vLLM engines with it: they run in sessions of
    their own, so nothing else would stop them, and their ports and memory would stay taken."""
    import os
    import signal
    import subprocess
    import time

    from gateway.local_server import free_port

    parent = subprocess.Popen([sys.executable, "-c", PARENT, launcher, str(tmp_path / "vllm.log"), str(free_port())],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(next(line for line in parent.stdout if line.strip().isdigit()))  # after VLLMProcess's own lines
    time.sleep(1.0)  # the wrapper has set its parent-death signal and exec'd the command
    assert not _gone(pid) and "time.sleep(600)" in Path(f"/proc/{pid}/cmdline").read_text()
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while not _gone(pid):
        assert time.monotonic() < deadline, "the child outlived the process that started it"
        time.sleep(0.1)
