"""`python -m pipeline` as a user runs it: a subprocess, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_checkpoint, tiny_llama_config

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    if "--model" not in args and "--remote" not in args:
        args = ("--model", "demo", *args)  # the bundled model unless a test names another
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_plan_only_json_puts_layers_on_disk(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # hidden 128: each layer is 590 KiB in float32, so a 1 MiB CPU budget holds the embeddings only.
    checkpoint = save_checkpoint(tiny_llama_config(len(tok), hidden=128), tmp_path / "ckpt", tok)
    offload = tmp_path / "offload"
    result = run("--model", str(checkpoint), "--cpu-memory", "0.001", "--disk", "--offload-dir", str(offload),
                 "--plan-only", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["layers_per_device"]["disk"] == [0, 1, 2, 3]
    assert plan["device_map"]["model.layers.0"] == "disk"
    assert set(plan["bytes_per_device"]) == {"cpu", "disk"}
    assert not offload.exists()  # planning loads and writes nothing


def test_prompt_streams_a_reply_from_the_demo_model(demo_dir: Path) -> None:
    result = run("--prompt", "And God said", "--max-new-tokens", "24", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("plan: CPU: embeddings")
    assert lines[-1].startswith("[") and "tokens/s" in lines[-1] and "first token" in lines[-1]
    reply = "\n".join(lines[2:-1])
    assert len(reply.split()) >= 5, result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-preset", "--plan-only"], "error: model='no-such-preset' is not a preset"),
        (["--cpu-memory", "-3", "--plan-only"], "error: cpu_memory='-3' is negative"),
        (["--cpu-memory", "nan", "--plan-only"], "error: cpu_memory='nan' is not a finite number"),
        (["--cpu-memory", "999999", "--plan-only"], "is more than this machine has"),
        (["--gpu-memory", "4", "--prompt", "hi"], "this machine has no CUDA GPU"),
        (["--model", "/no/such/folder", "--plan-only"], "error: model path '/no/such/folder' does not exist"),
        (["--cpu-memory", "0.0001", "--plan-only"], "which is off. Turn disk offload on"),
        (["--temperature", "-1", "--prompt", "hi"], "error: temperature='-1' is out of range"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.parametrize(("signal_name", "code", "said"), [("SIGINT", 130, "[cancelled]"), ("SIGTERM", 143, "terminated")])
def test_a_signal_while_streaming_stops_cleanly(endless_model: Path, tmp_path: Path, signal_name: str, code: int,
                                                said: str) -> None:
    import signal

    offload = tmp_path / "offload"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--model", str(endless_model), "--cpu-memory",
                             "0.001", "--disk", "--offload-dir", str(offload), "--prompt", "Hello",
                             "--max-new-tokens", "2000", "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            # A suite started in the background by a non-interactive shell inherits SIGINT
                            # ignored, and Python then never installs its handler: the CLI ran to its 2000
                            # tokens and exited 0. The CLI under test gets SIGINT as a terminal delivers it.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(3):  # the plan, its dtype line and its predicted speed
        proc.stdout.readline()
    assert proc.stdout.read(8)  # the reply is streaming
    assert any(offload.glob("*")), "the load made no offload folder"
    proc.send_signal(getattr(signal, signal_name))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert said in err and "Traceback" not in err
    if signal_name == "SIGINT":
        assert "finished: cancelled" in out and "finished: eos" not in out
    assert not any(offload.glob("*")), "the offload folder was left behind"


def test_invalid_utf8_and_a_closed_stdin_are_no_tracebacks(demo_dir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "pipeline", "--model", "demo", "--max-new-tokens", "4"], input=b"\xff\xfe hello\n",
                         capture_output=True, timeout=300, env=env, cwd=REPO)
    assert bad.returncode == 0 and b"Traceback" not in bad.stderr, bad.stderr.decode(errors="replace")
    assert b"finished:" in bad.stdout  # the line was answered
    closed = subprocess.run(["bash", "-c", f"{sys.executable} -m pipeline --model demo --max-new-tokens 4 0<&-"],
                            capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr


def test_the_app_refuses_a_port_out_of_range() -> None:
    result = subprocess.run([sys.executable, "app.py", "--port", "99999"], capture_output=True, text=True, timeout=120,
                            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "'99999' is not a port; accepted: an integer from 1 to 65535" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_answers_the_openai_api_without_the_ui(tmp_path: Path) -> None:
    """`python -m pipeline serve`: the model behind /v1 alone, with a key; SIGTERM stops it cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from openai import OpenAI

    from app_server import REPO, free_port

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OFFLOAD_CHAT_API_KEY": "serve-key"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--model", "demo", "--port", str(port)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="serve-key", max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                models = [m.id for m in client.models.list()]
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        assert models == ["demo"]
        answer = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "And God said"}],
                                                max_tokens=6, temperature=0)
        assert answer.usage.completion_tokens == 6 and answer.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, 143)
        assert "serving 'demo' on http://127.0.0.1" in log.read_text()
    finally:
        proc.kill()


def test_plan_only_for_a_gpu_this_machine_does_not_have_with_predicted_speed() -> None:
    """`--plan-only --json --gpu-memory 24` on a machine without a GPU: a CUDA machine's plan, with its speed."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the what-if path is for GPUs a machine lacks")
    result = run("--model", "smollm2-135m-instruct", "--plan-only", "--json", "--gpu-memory", "24")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["what_if"] is True and set(plan["bytes_per_device"]) == {"0"}
    assert plan["dtype"] in ("bfloat16", "float16") and plan["estimate"]["decode_tokens_per_s"] > 0
    assert "assumed" in plan["estimate"]["source"]
    small = json.loads(run("--model", "smollm2-135m-instruct", "--plan-only", "--json", "--gpu-memory", "0.1",
                           "--quant", "nf4").stdout)
    assert small["compressed"] is True and small["bytes_per_device"]["cpu"] > 0  # engine pricing, as on CUDA
    assert small["estimate"]["link_bytes_per_token"] == small["bytes_per_device"]["cpu"]
    assert small["estimate"]["decode_tokens_per_s"] < plan["estimate"]["decode_tokens_per_s"]
    text = run("--model", "demo", "--plan-only").stdout
    assert "speed: ≈" in text and "tokens/s" in text and "measured on" in text  # this machine: measured
    refused = run("--model", "demo", "--gpu-memory", "24", "--prompt", "hi")
    assert refused.returncode == 2 and "loading needs the real hardware" in refused.stderr


def test_speculation_flag_and_the_tokens_per_step_stat() -> None:
    prompt = "And God said, Let there be light: and there was light. " * 3 + "And God said,"
    on = run("--prompt", prompt, "--max-new-tokens", "40", "--temperature", "0", "--repetition-penalty", "1")
    off = run("--prompt", prompt, "--max-new-tokens", "40", "--temperature", "0", "--repetition-penalty", "1",
              "--speculate", "off")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    reply = lambda out: "\n".join(out.stdout.strip().splitlines()[3:-1])  # noqa: E731 - after plan, dtype, speed
    assert reply(on) == reply(off)
    assert "· 1.0 tokens/step" in off.stdout.splitlines()[-1] and "tokens/step" in on.stdout.splitlines()[-1]
    refused = run("--prompt", "hi", "--speculate", "draft")
    assert refused.returncode == 2 and "--speculate draft needs a draft model, and Demo" in refused.stderr
    assert "--draft PRESET_OR_PATH" in refused.stderr
    draft = run("--prompt", prompt, "--max-new-tokens", "40", "--temperature", "0", "--repetition-penalty", "1",
                "--draft", "demo")  # a draft attached: --speculate defaults to draft
    assert draft.returncode == 0, draft.stderr
    assert "\n".join(draft.stdout.strip().splitlines()[4:-1]) == reply(off)  # (a plan line more: the draft)
    steps = lambda out: float(out.stdout.splitlines()[-1].split(" tokens/step")[0].rsplit("· ", 1)[-1])  # noqa: E731
    assert steps(draft) > steps(on) + 1, (steps(draft), steps(on))  # an identical draft is always right


def test_plan_only_shows_the_draft_and_takes_it_out_of_the_budget() -> None:
    alone = json.loads(run("--model", "demo", "--plan-only", "--json", "--cpu-memory", "1").stdout)
    result = run("--model", "demo", "--draft", "demo", "--plan-only", "--json", "--cpu-memory", "1")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    draft = plan["draft"]
    # The demo drafting for itself: its weights are the target's; its cache: keys and values x 6 layers x
    # 4 key/value heads x 32 x 4 bytes (float32 on the CPU) x 512 tokens = 3 MiB.
    assert draft["device"] == "cpu" and draft["weight_bytes"] == alone["bytes_per_device"]["cpu"]
    assert draft["cache_bytes"] == 2 * 6 * 4 * 32 * 4 * 512 and draft["context_length"] == 512
    text = run("--model", "demo", "--draft", "demo", "--plan-only", "--cpu-memory", "1").stdout
    assert "draft Demo (bundled KJV model, 6M params) on CPU (22.0 MiB + 3.0 MiB KV cache for 512 tokens): taken " \
           "out of the CPU budget" in text
    tight = run("--model", "demo", "--draft", "demo", "--plan-only", "--cpu-memory", "0.03", "--disk")
    assert tight.returncode == 0 and "disk:" in tight.stdout.splitlines()[0], tight.stdout + tight.stderr
    assert "disk" not in run("--model", "demo", "--plan-only", "--cpu-memory", "0.03", "--disk").stdout.splitlines()[0]
    other = run("--model", "demo", "--draft", "smollm2-135m-instruct", "--plan-only")
    assert other.returncode == 2 and "does not share the tokenizer of 'Demo" in other.stderr, other.stderr
