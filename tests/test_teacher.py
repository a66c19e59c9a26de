"""Learning from a black-box teacher (``teacher``): the HTTP client's retries, timeout, concurrency bound and
validation against a real local server, the on-disk cache, the verbatim filter against difflib, the distillation loss
against PyTorch's soft-target cross-entropy, and the CLI end to end with fedlm's own ``serve`` as the teacher."""

from __future__ import annotations

import difflib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, write_config
from inference_fixtures import perturb_adapter
from teacher_fixtures import DEFAULT_ANSWER, TABLE, Stub, answer_body, free_port, serve

from fedlm.cli.main import app
from fedlm.config.io import load_config, validate_config
from fedlm.core.errors import FedlmError
from fedlm.core.task import ClientContext, ClientTask, LocalPlan
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.data.tokenize import IGNORE_INDEX, TokenizedExample
from fedlm.privacy.accounting import epsilon
from fedlm.privacy.sample_dp import sampling_rate
from fedlm.teacher.audit import TeacherAudit, prompt_hash
from fedlm.teacher.cache import ResponseCache, request_key
from fedlm.teacher.client import Answer, Rejected, TeacherClient, TeacherEndpoint, TeacherUnavailable, parse_answer
from fedlm.teacher.kd import collate_taught, distillation_loss
from fedlm.teacher.labeling import TaughtExample, Teaching, client_records
from fedlm.teacher.runtime import SYNTHETIC_FILE, PairedData, TeacherRuntime
from fedlm.teacher.synthetic import VerbatimFilter, prompt_messages

PROMPT = [{"role": "user", "content": "What is a cat?"}]


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[Stub, str]]:
    teacher = Stub(flaky_failures=2, slow_s=0.25)
    with serve(teacher.app) as base:
        yield teacher, base


def _client(base: str, route: str, sleeps: list[float] | None = None, **kw: Any) -> TeacherClient:
    settings: dict[str, Any] = {"retries": 3, "backoff_s": 0.01, "timeout_s": 5.0, "concurrency": 4} | kw
    endpoint = TeacherEndpoint(f"{base}/{route}/v1", "stub", None, {"max_tokens": 16, "logprobs": True, "top_logprobs": 2}, **settings)
    return TeacherClient(endpoint, sleep=sleeps.append if sleeps is not None else (lambda s: None))


# ------------------------------------------------------------------------------------------- client


def test_answer_from_table_with_logprobs(stub: tuple[Stub, str]) -> None:
    _, base = stub
    answer = _client(base, "ok").ask(PROMPT)
    assert isinstance(answer, Answer)
    assert answer.text == TABLE["What is a cat?"]
    assert answer.tokens is not None and "".join(answer.tokens) == answer.text
    assert answer.top is not None and answer.top[0][0] == ("A", -0.1)


def test_retries_with_doubling_backoff_then_answers(stub: tuple[Stub, str]) -> None:
    teacher, base = stub
    before = teacher.calls["flaky"]
    sleeps: list[float] = []
    answer = _client(base, "flaky", sleeps, backoff_s=0.01).ask(PROMPT)
    assert isinstance(answer, Answer) and answer.text == TABLE["What is a cat?"]
    assert teacher.calls["flaky"] - before == 3  # two HTTP 503, then the answer
    assert sleeps == [0.01, 0.02]


def test_failing_endpoint_names_endpoint_and_status_after_the_retries(stub: tuple[Stub, str]) -> None:
    teacher, base = stub
    before = teacher.calls["down"]
    sleeps: list[float] = []
    with pytest.raises(TeacherUnavailable, match=r"down/v1 \(model 'stub'\) failed after 3 attempt\(s\): HTTP 500: teacher overloaded"):
        _client(base, "down", sleeps, retries=2).ask(PROMPT)
    assert teacher.calls["down"] - before == 3
    assert sleeps == [0.01, 0.02]


def test_unreachable_and_timed_out_endpoints_fail_after_the_retries(stub: tuple[Stub, str]) -> None:
    _, base = stub
    with pytest.raises(TeacherUnavailable, match=r"127\.0\.0\.1:\d+/x/v1 .* 2 attempt\(s\): unreachable"):
        _client(f"http://127.0.0.1:{free_port()}", "x", retries=1).ask(PROMPT)
    with pytest.raises(TeacherUnavailable, match=r"failed after 2 attempt\(s\): timed out after 0.05s"):
        _client(base, "slow", retries=1, timeout_s=0.05).ask(PROMPT)


def test_response_without_fields_is_rejected_and_reported(stub: tuple[Stub, str]) -> None:
    _, base = stub
    reports: list[tuple[int, str, str]] = []
    results = _client(base, "bad").ask_all([PROMPT, PROMPT], lambda i, status, detail: reports.append((i, status, detail)))
    assert all(isinstance(r, Rejected) for r in results)
    assert sorted(reports) == [(0, "rejected", "the response has no `choices`"), (1, "rejected", "the response has no `choices`")]
    assert isinstance(parse_answer(json.dumps({"choices": [{"message": {"role": "assistant"}}]})), Rejected)
    assert isinstance(parse_answer("<html>"), Rejected)
    malformed = answer_body("Hi.", logprobs=True)
    malformed["choices"][0]["logprobs"]["content"][0].pop("token")
    assert parse_answer(json.dumps(malformed)) == Answer("Hi.")  # the text is kept, the broken logprobs are not


def test_concurrency_is_bounded() -> None:
    # its own stub: the module's one may still hold requests an earlier test timed out on, which would count here
    teacher = Stub(slow_s=0.5)
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    with serve(teacher.app) as base:
        # no retries and a long timeout: a timed-out request retried while the server still holds the first one would
        # count twice on the server's side without the client ever having more than 2 in flight
        results = _client(base, "slow", concurrency=2, retries=0, timeout_s=120.0).ask_all(prompts, lambda *a: None)
    assert [r.text for r in results if isinstance(r, Answer)] == [DEFAULT_ANSWER] * 6
    assert teacher.max_in_flight == 2


# -------------------------------------------------------------------------------------- cache, audit


def test_cache_keys_and_round_trip(tmp_path: Path) -> None:
    params = {"max_tokens": 16, "temperature": 0.0}
    key = request_key("m", PROMPT, params)
    assert key == request_key("m", [dict(PROMPT[0])], dict(reversed(params.items())))  # canonical JSON
    assert len({key, request_key("m2", PROMPT, params), request_key("m", PROMPT, params | {"temperature": 1.0})}) == 3
    cache = ResponseCache(tmp_path / "cache")
    assert cache.get(key) is None
    answer = Answer("Blue.", ["Bl", "ue."], [[("Bl", -0.5)], [("ue.", -0.1), ("e", -4.0)]])
    cache.put(key, answer.to_json())
    assert Answer.from_json(cache.get(key) or {}) == answer
    (tmp_path / "cache" / key[:2] / f"{key}.json").write_text("{broken")
    assert cache.get(key) is None  # asked again rather than trusted


def test_audit_logs_hashes_not_text(tmp_path: Path) -> None:
    audit = TeacherAudit(tmp_path)
    audit.record("a", 1, PROMPT, "own", "sent")
    audit.record("a", 1, PROMPT, "own", "failed", "HTTP 500")
    text = audit.path("a").read_text()
    assert "cat" not in text and prompt_hash(PROMPT) in text
    assert audit.counts("a") == {"sent": 1, "failed": 1}


# ---------------------------------------------------------------------------------- verbatim filter


class _CharTokenizer:
    """One token per character: token boundaries are known exactly, as the reference needs."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def _longest_common_substring(a: str, b: str) -> int:
    match = difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return match.size


def test_verbatim_filter_agrees_with_difflib_longest_common_substring() -> None:
    rng = random.Random(0)
    records = ["".join(rng.choice("abcd") for _ in range(40)) for _ in range(5)]
    for max_overlap in (3, 6, 10):
        guard = VerbatimFilter(_CharTokenizer(), records, max_overlap)  # type: ignore[arg-type]
        for _ in range(60):
            text = "".join(rng.choice("abcd") for _ in range(rng.randint(1, 30)))
            longest = max(_longest_common_substring(text, r) for r in records)
            assert guard.copies(text) == (longest > max_overlap), (text, longest, max_overlap)
    assert VerbatimFilter(_CharTokenizer(), ["the whole record"], 4).copies("prefix the whole record")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- distillation


def test_topk_loss_over_the_whole_vocabulary_is_soft_target_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab, width = 7, 5
    teacher_logp = F.log_softmax(torch.randn(width, vocab, generator=gen), dim=-1)
    labels = [IGNORE_INDEX, IGNORE_INDEX, 3, 1, 5]
    top = {t: [(v, float(teacher_logp[t, v])) for v in range(vocab)] for t in (2, 3)}  # position 4: no top-k
    batch = collate_taught([TaughtExample(TokenizedExample([0, 1, 2, 3, 1], labels), top)], pad_id=0)
    logits = torch.randn(1, width - 1, vocab, generator=gen)
    got = distillation_loss(logits, batch)
    soft = F.cross_entropy(logits[0, 1:3], teacher_logp[2:4].exp())  # the teacher's full distributions
    hard = F.cross_entropy(logits[0, 3:4], torch.tensor([5]))
    torch.testing.assert_close(got, (2 * soft + hard) / 3)
    plain = collate_taught([TaughtExample(TokenizedExample([0, 1, 2, 3, 1], labels), {})], pad_id=0)
    reference = F.cross_entropy(logits[0], torch.tensor(labels[1:]), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(distillation_loss(logits, plain), reference)  # sequence-level KD: cross-entropy


# ------------------------------------------------------------------------------------------- config


def test_config_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def load(**teacher: Any) -> None:
        validate_config(tiny_config(tmp_path, **teacher))

    with pytest.raises(FedlmError, match="needs `teacher.base_url` and `teacher.model`"):
        load(teacher={"mode": "label"})
    ok = {"mode": "label", "base_url": "http://127.0.0.1:1/v1", "model": "t"}
    with pytest.raises(FedlmError, match="simulation only"):
        load(teacher=ok, federation={"runtime": "flower"})
    with pytest.raises(FedlmError, match="`privacy.sample_dp`"):
        load(teacher=ok, privacy={"sample_dp": {"noise_multiplier": 1.0}})
    with pytest.raises(FedlmError, match="teacher.synthetic.noise_multiplier"):
        load(teacher={**ok, "mode": "synthetic", "synthetic": {}})
    monkeypatch.delenv("FEDLM_TEST_TEACHER_KEY", raising=False)
    with pytest.raises(FedlmError, match="FEDLM_TEST_TEACHER_KEY is not set"):
        load(teacher={**ok, "api_key_env": "FEDLM_TEST_TEACHER_KEY"})


# ------------------------------------------------------------------------------------------- the CLI


def teacher_run(root: Path) -> Path:
    """A run folder as ``fedlm run`` leaves it (config.yaml, adapter/), its LoRA adapter set to seeded noise rather
    than trained: a teacher unlike the students, made in a second instead of a run's time."""
    from fedlm.config.io import save_config
    from fedlm.experiment import build_model
    from fedlm.models.adapters import save_adapter, trainable_state
    from fedlm.reporting.progress import RunConsole

    config = validate_config(tiny_config(root))
    root.mkdir(parents=True)
    save_config(config, root / "config.yaml")
    loaded, model, _ = build_model(config, RunConsole(quiet=True))
    save_adapter(model, trainable_state(model), root / "adapter")
    loaded.tokenizer.save_pretrained(str(root / "adapter"))
    perturb_adapter(root / "adapter", root / "adapter", seed=3)
    return root


@pytest.fixture(scope="module")
def fedlm_teacher(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Iterator[tuple[str, Any]]:
    """fedlm's own OpenAI server (``fedlm serve``'s app and engine) over a tiny run, in a thread: the teacher's
    ``base_url``, and its tokenizer (the tiny model's, the students' too)."""
    from fedlm.inference.engine import Engine
    from fedlm.inference.run import open_run
    from fedlm.inference.server import create_app
    from fedlm.inference.session import inference_settings

    run = open_run(teacher_run(tmp_path_factory.mktemp("teacher") / "run"))
    engine = Engine(run, inference_settings(run.config.inference))
    with serve(create_app(engine)) as base:
        yield f"{base}/v1", run.tokenizer
    engine.close()


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train_with_teacher(tmp_path: Path, runner: Any, teacher: dict[str, Any], rounds: int) -> list[dict[str, Any]]:
    """A tiny run of 2 iid clients (24 records, 1 local step per round) with ``teacher`` through the CLI (config
    ``tmp_path/c.yaml``, run ``tmp_path/run``); its train records."""
    config = tiny_config(
        tmp_path / "run",
        teacher=teacher,
        data={"max_train_examples": 24, "max_length": 96},
        partition={"method": "iid", "num_clients": 2},
        federation={"rounds": rounds, "clients_per_round": 2, "local_steps": 1, "batch_size": 4},
        eval={"every": 0, "at_start": False, "generate": False, "max_examples": 4},
    )
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    return [r for r in _records(tmp_path / "run" / "metrics.jsonl") if r.get("split") == "train"]


def test_cli_label_mode_with_fedlm_serve_as_teacher(tmp_path: Path, runner: Any, fedlm_teacher: tuple[str, Any]) -> None:
    teacher = {"mode": "label", "base_url": fedlm_teacher[0], "model": "global", "max_tokens": 8, "mix": 0.5, "concurrency": 4}
    train = _train_with_teacher(tmp_path, runner, teacher, rounds=2)
    assert {r["round"] for r in train} == {1, 2} and len(train) == 4
    for r in train:
        assert r["teacher_prompts"] == r["teacher_examples"] > 0
        assert r["teacher_sent"] == (r["teacher_prompts"] if r["round"] == 1 else 0)  # round 2: all from the cache
        assert r["teacher_topk_examples"] == 0  # fedlm serve gives no logprobs: sequence-level KD
        assert r["loss"] == pytest.approx(0.5 * r["own_loss"] + 0.5 * r["teacher_loss"], rel=1e-5)  # mix 0.5

    prompts = client_records(load_config(tmp_path / "c.yaml"))
    for client, records in prompts.items():
        audit = _records(tmp_path / "run" / "teacher" / "audit" / f"{client}.jsonl")
        assert sorted(a["prompt_sha256"] for a in audit) == sorted(prompt_hash(p) for p in records.prompts)  # each once
        assert {a["status"] for a in audit} == {"sent"} and all(p[-1]["role"] == "user" for p in records.prompts)
    assert len(list((tmp_path / "run" / "teacher" / "cache").rglob("*.json"))) == sum(len(r.prompts) for r in prompts.values())


def test_teacher_tokens_aligned_to_the_student_for_topk(fedlm_teacher: tuple[str, Any]) -> None:
    tokenizer = fedlm_teacher[1]
    teaching = Teaching(tokenizer, max_length=128)
    answer = parse_answer(json.dumps(answer_body("A small animal.", logprobs=True)))
    assert isinstance(answer, Answer)
    taught = teaching.example(PROMPT, answer)
    assert taught is not None
    positions = [t for t, label in enumerate(taught.tokens.labels) if label != IGNORE_INDEX]
    assert sorted(taught.top) == positions[: len("A small animal.")]  # every answer token; the end-of-turn tokens: CE
    first = taught.top[positions[0]]
    assert first[0] == (taught.tokens.labels[positions[0]], -0.1) and len(first) == 3
    merged = Answer("A small animal.", ["A small", " animal."], [[("A small", -0.1)], [(" animal.", -0.1)]])
    other = teaching.example(PROMPT, merged)
    assert other is not None and other.top == {}  # another tokenizer's tokens: sequence-level KD
    assert other.tokens == taught.tokens


class _FakeSource:
    def taught(self, client: str, round_num: int) -> tuple[list[TaughtExample], dict[str, float]]:
        if client == "b":
            raise TeacherUnavailable("teacher http://127.0.0.1:9/v1 (model 't') failed after 4 attempt(s): HTTP 500: down")
        return [TaughtExample(TokenizedExample([1, 2], [IGNORE_INDEX, 2]), {})], {"teacher_sent": 1.0}


class _Inner:
    def __init__(self, view: PairedData) -> None:
        self.view, self.seen = view, {}

    def train_clients(self, tasks: dict[str, ClientTask]) -> list[ClientUpdate]:
        self.seen = {c: list(self.view[c]) for c in tasks}
        return [ClientUpdate(c, t.plan.round, len(self.view[c]), {}, {"loss": 1.0}) for c, t in tasks.items()]


def test_a_client_whose_teacher_fails_is_left_out_and_the_round_goes_on() -> None:
    view = PairedData()
    inner = _Inner(view)
    own = {"a": ["a0", "a1", "a2"], "b": ["b0"], "c": ["c0"]}
    runtime = TeacherRuntime(inner, _FakeSource(), view, own)  # type: ignore[arg-type]
    tasks = {c: ClientTask(LocalPlan(1, [0.1], 2, 0), {}, ClientContext(c, 1)) for c in ("a", "b", "c")}
    results = runtime.train_clients(tasks)
    assert [r.client_id for r in results] == ["a", "b", "c"]
    failure = results[1]
    assert isinstance(failure, ClientFailure) and "teacher http://127.0.0.1:9/v1" in failure.reason and "HTTP 500" in failure.reason
    assert sorted(inner.seen) == ["a", "c"] and [p.own for p in inner.seen["a"]] == own["a"]
    assert isinstance(results[0], ClientUpdate) and results[0].metrics == {"loss": 1.0, "teacher_sent": 1.0}
    assert len(view) == 0  # nothing kept between rounds


@pytest.mark.slow
def test_cli_synthetic_mode_sends_only_dp_synthetic_prompts(tmp_path: Path, runner: Any, stub: tuple[Stub, str], one_torch_thread: None) -> None:
    synthetic = {"num_prompts": 8, "max_prompt_tokens": 16, "steps": 2, "batch_size": 4, "noise_multiplier": 1.0, "max_overlap": 8}
    teacher = {"mode": "synthetic", "base_url": f"{stub[1]}/ok/v1", "model": "stub", "max_tokens": 16, "synthetic": synthetic}
    train = _train_with_teacher(tmp_path, runner, teacher, rounds=1)
    own = client_records(load_config(tmp_path / "c.yaml"))
    assert len(train) == 2
    for r in train:
        client = r["client"]
        made = json.loads((tmp_path / "run" / "clients" / client / SYNTHETIC_FILE).read_text())
        expected = epsilon(1.0, sampling_rate(4, len(own[client].prompts)), 2, 1e-5)
        assert r["generator_epsilon"] == pytest.approx(expected) == pytest.approx(made["epsilon"])
        assert made["generated"] == 8 == made["filtered"] + made["empty"] + len(made["prompts"])
        assert r["teacher_prompts"] == len(made["prompts"]) and r["teacher_topk_examples"] == r["teacher_examples"] > 0
        audit = _records(tmp_path / "run" / "teacher" / "audit" / f"{client}.jsonl")
        sent = {a["prompt_sha256"] for a in audit}
        assert {a["source"] for a in audit} == {"synthetic"}
        assert sent == {prompt_hash(prompt_messages(text, None)) for text in made["prompts"]}
        assert not sent & {prompt_hash(p) for p in own[client].prompts}  # none of the client's own prompts left
