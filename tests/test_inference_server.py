"""``fedlm serve`` as a real process on 127.0.0.1, driven by the official ``openai`` client: models, chat and text
completions (whole and streamed), stop strings, errors (401, 404, 400) after which it keeps serving, concurrent
requests for several clients batched per adapter, and greedy answers equal to transformers' ``generate``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from inference_fixtures import add_clients, tiny_run
from peft import PeftModel

from fedlm.core.seeding import derive_seed
from fedlm.inference.generate import chat_prompt
from fedlm.inference.run import open_run
from fedlm.models.loading import load_base_model

SRC = Path(__file__).resolve().parents[1] / "src"
KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("serverun")
    run_dir = tiny_run(root, CliRunner())
    add_clients(run_dir, "replace")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    log = (root / "server.log").open("w")
    cmd = [sys.executable, "-m", "fedlm.cli", "serve", str(run_dir), "--port", str(port), "--api-key", KEY, "--weight", "0.5"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, (root / "server.log").read_text()
        try:
            if httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not start: " + (root / "server.log").read_text())
    yield base, run_dir
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def client(server: tuple[str, Path]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, model: str, text: str, **kw: object) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], temperature=0, **kw)  # type: ignore[call-overload]
    return str(reply.choices[0].message.content)


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["global"] + [f"client/{c}{s}" for c in ("alice", "bob") for s in ("", "+adapter", "+logits")]


def test_greedy_chat_equals_transformers_generate(client: openai.OpenAI, server: tuple[str, Path]) -> None:
    run_dir = server[1]
    run = open_run(run_dir)
    loaded = load_base_model(run.config.model, seed=derive_seed(run.config.seed, "base-init") % 2**31)
    model = PeftModel.from_pretrained(loaded.model, str(run_dir / "clients" / "alice" / "adapter")).eval()
    prompt = chat_prompt(run.tokenizer, [{"role": "user", "content": "Tell me about dogs."}])
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=run.tokenizer.pad_token_id)
    new = out[0, len(prompt) :].tolist()
    new = new[: new.index(run.tokenizer.eos_token_id)] if run.tokenizer.eos_token_id in new else new
    expected = run.tokenizer.decode(new, skip_special_tokens=True)
    assert _chat(client, "client/alice", "Tell me about dogs.", max_tokens=10) == expected
    assert _chat(client, "global", "Tell me about dogs.", max_tokens=10) != expected  # another adapter, another answer


def test_streaming_equals_whole_and_stop(client: openai.OpenAI) -> None:
    whole = _chat(client, "client/bob+adapter", "Count with me.", max_tokens=12)
    stream = client.chat.completions.create(
        model="client/bob+adapter", messages=[{"role": "user", "content": "Count with me."}], temperature=0, max_tokens=12, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    counted = client.chat.completions.create(
        model="client/bob+adapter",
        messages=[{"role": "user", "content": "Count with me."}],
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    last = list(counted)[-1]
    assert last.choices == [] and last.usage is not None and 1 <= last.usage.completion_tokens <= 12
    assert len(whole) >= 4
    stop = whole[2:4]
    cut = client.chat.completions.create(
        model="client/bob+adapter", messages=[{"role": "user", "content": "Count with me."}], temperature=0, max_tokens=12, stop=[stop]
    )
    assert cut.choices[0].message.content == whole[: whole.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_text_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="client/alice+logits", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage is not None and reply.usage.completion_tokens <= 6
    pieces = client.completions.create(model="client/alice+logits", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in pieces) == reply.choices[0].text
    sampled = client.completions.create(model="global", prompt="Once", max_tokens=5, temperature=0.9, top_p=0.9, seed=7)
    again = client.completions.create(model="global", prompt="Once", max_tokens=5, temperature=0.9, top_p=0.9, seed=7)
    assert sampled.choices[0].text == again.choices[0].text


def test_errors_then_still_serving(client: openai.OpenAI, server: tuple[str, Path]) -> None:
    with pytest.raises(openai.NotFoundError, match="client/carol.*served models"):
        _chat(client, "client/carol", "Hi")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="global", messages=[{"role": "user", "content": "Hi"}], temperature=5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="global", messages=[])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="global", prompt="x" * 1000, max_tokens=100, temperature=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(
        server[0] + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    )
    assert raw.status_code == 400 and "error" in raw.json()
    assert isinstance(_chat(client, "global", "Still there?", max_tokens=3), str)


def test_concurrent_clients_batched_and_correct(client: openai.OpenAI, server: tuple[str, Path]) -> None:
    jobs = [("client/alice", "Question one?"), ("client/bob", "Question two?"), ("client/alice", "Question three?"), ("global", "Question four?")] * 2
    alone = [_chat(client, model, text, max_tokens=8) for model, text in jobs]
    before = len(httpx.get(server[0] + "/fedlm/stats", headers={"Authorization": f"Bearer {KEY}"}).json()["batches"])
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _chat(client, job[0], job[1], max_tokens=8), jobs))
    assert together == alone  # each request got its own adapter's answer
    batches = httpx.get(server[0] + "/fedlm/stats", headers={"Authorization": f"Bearer {KEY}"}).json()["batches"][before:]
    assert sum(batches) == len(jobs) and len(batches) < len(jobs)  # requests for the same adapter shared a batch
