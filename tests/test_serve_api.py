"""``flask_server.py``'s HTTP API: PaddleNLP's ``/api/chat`` and the OpenAI-compatible routes.

One real server (the script, in a subprocess on 127.0.0.1, demo model, ``--no_ui``, an API key) answers the
end-to-end cases; the official ``openai`` client talks to it. Expected outputs come from the in-process
:class:`Predictor` with greedy search on the same model (the scheduler's greedy output does not depend on
batching). A few unit cases check the request parsing against ``Predictor.prompt_ids`` directly.
"""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix first)

# isort: split
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from llm.infer.arguments import PredictorArgument
from llm.infer.predictor import Predictor
from llm.serve.api import ApiError, parse_chat, parse_paddle_chat
from llm.serve.scheduler import Scheduler
from llm.serve.service import Sampling, Service, decoding, find_stop, held_back, server_sampling

try:
    import helpers_serve as hs
except ImportError:  # tests/ imported as a package
    from tests import helpers_serve as hs

KEY = "test-key-123"
SRC, MAX = 64, 24
U1, B1, U2, B2 = "spell: 12", "twelve", "digits: seventy one", "71"
QUERY = "spell: 342"
GREEDY = {"top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hs.Server]:
    """The server process, started first so that it loads while the test process loads its predictor."""
    log = tmp_path_factory.mktemp("serve-api") / "server.log"
    args = ["--model_name_or_path", hs.DEMO_MODEL, "--no_ui", "--api_key", KEY]
    args += ["--src_length", str(SRC), "--max_length", str(MAX), "--max_batch_size", "4"]
    srv = hs.Server(args + ["--max_body_bytes", "65536"], log)
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
        assert "Traceback" not in srv.log()


@pytest.fixture(scope="module")
def predictor(started: hs.Server) -> Predictor:
    """The same model in process, greedy."""
    args = PredictorArgument(
        model_name_or_path=hs.DEMO_MODEL,
        src_length=SRC,
        max_length=MAX,
        decode_strategy="greedy_search",
        device="cpu",
    )
    return Predictor.from_args(args)


@pytest.fixture(scope="module")
def server(started: hs.Server, predictor: Predictor) -> hs.Server:
    return started.wait_ready()


@pytest.fixture(scope="module")
def client(server: hs.Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def service(predictor: Predictor) -> Service:
    """Request parsing over the in-process predictor (the scheduler is never started)."""
    args = PredictorArgument(model_name_or_path=hs.DEMO_MODEL)
    return Service(
        predictor,
        Scheduler(predictor.engine),
        model_name="model",
        defaults=server_sampling(args, hs.DEMO_MODEL),
        seed=None,
    )


def expected(predictor: Predictor, prompt: Any) -> tuple[str, list[int]]:
    texts, tokens = predictor.predict([prompt], return_tokens=True)
    return texts[0], tokens[0]


def expected_raw(predictor: Predictor, text: str) -> tuple[str, list[int]]:
    tokens = predictor.generate_ids([predictor.tokenizer.encode(text, add_special_tokens=True)])[0]
    return predictor.tokenizer.decode(tokens, skip_special_tokens=True), tokens


def chat(server: hs.Server, body: dict[str, Any], key: str | None = KEY) -> tuple[int, list[dict[str, Any]]]:
    status, data = hs.request(server.port, "POST", "/api/chat", body, key=key)
    return status, hs.ndjson(data)


# ------------------------------------------------------------------------------------------ unit: parsing
def test_paddle_history_forms_build_the_predictor_prompt(service: Service, predictor: Predictor) -> None:
    want = predictor.prompt_ids([[U1, B1], [U2, B2], [QUERY]])
    forms = [
        [U1, B1, U2, B2],
        [
            {"role": "user", "utterance": U1},
            {"role": "bot", "utterance": B1},
            {"utterance": U2},
            {"utterance": B2},
        ],
        json.dumps([U1, B1, U2, B2]),
        json.dumps([{"utterance": t} for t in (U1, B1, U2, B2)]),
    ]
    for history in forms:
        req = parse_paddle_chat({"context": QUERY, "history": history, **GREEDY, "max_length": 8}, service)
        assert req.prompt_ids == want, history
        assert req.max_tokens == 8
    prompt_text = predictor.tokenizer.decode(want, skip_special_tokens=False)
    assert prompt_text.count(QUERY) == 1  # the current turn appears once
    assert prompt_text.endswith(f"<|user|>{QUERY}<|assistant|>")
    # no history: the prompt of a single turn
    req = parse_paddle_chat({"context": QUERY, "history": []}, service)
    assert req.prompt_ids == predictor.prompt_ids(QUERY)


@pytest.mark.parametrize(
    ("history", "words"),
    [
        ([U1], "even number of turns"),
        ('["a", "b"', "not JSON"),
        ([U1, {"utterance": B1}], "mixes strings"),
        ([1, 2], "history[0]"),
        ({"u": "b"}, "must be a list"),
    ],
)
def test_paddle_bad_history_is_refused(service: Service, history: Any, words: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_paddle_chat({"context": QUERY, "history": history}, service)
    assert info.value.status == 400 and words in info.value.message


def test_openai_messages_build_the_predictor_prompt(service: Service, predictor: Predictor) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": U1},
        {"role": "assistant", "content": [{"type": "text", "text": B1}]},
        {"role": "user", "content": QUERY},
    ]
    req = parse_chat({"model": "model", "messages": messages}, service)
    assert req.prompt_ids == predictor.prompt_ids([[U1, B1], [QUERY]], {"system": "Be brief."})
    for bad, param in [
        ([{"role": "assistant", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "messages[1].role"),
        ([], "messages"),
    ]:
        with pytest.raises(ApiError) as info:
            parse_chat({"messages": bad}, service)
        assert info.value.status == 400 and info.value.param == param, bad


def test_decoding_mapping() -> None:
    assert decoding(Sampling())["decode_strategy"] == "greedy_search"  # the defaults
    assert decoding(Sampling(top_k=1, top_p=0.7, temperature=0.9))["decode_strategy"] == "greedy_search"
    assert decoding(Sampling(temperature=0.0, top_p=0.5))["decode_strategy"] == "greedy_search"
    paddle_client = decoding(Sampling(top_k=0, top_p=0.7, temperature=0.95, repetition_penalty=1.3))
    assert paddle_client == {
        "decode_strategy": "sampling",
        "top_k": 0,
        "top_p": 0.7,
        "temperature": 0.95,
        "repetition_penalty": 1.3,
    }
    assert decoding(Sampling(temperature=0.5))["decode_strategy"] == "sampling"
    assert decoding(Sampling(top_k=5))["top_k"] == 5
    greedy = decoding(Sampling(top_k=1, repetition_penalty=1.2))
    assert greedy["repetition_penalty"] == 1.2 and greedy["temperature"] == 1.0


def test_server_defaults_follow_the_predictor_flags() -> None:
    def defaults(**flags: Any) -> Sampling:
        return server_sampling(PredictorArgument(model_name_or_path=hs.DEMO_MODEL, **flags), hs.DEMO_MODEL)

    assert defaults() == Sampling()  # demo generation_config.json has no sampling keys: greedy
    assert defaults(decode_strategy="sampling") == Sampling(top_k=0, top_p=0.7, temperature=0.95)
    assert defaults(temperature=0.8, repetition_penalty=1.1) == Sampling(
        temperature=0.8, repetition_penalty=1.1
    )
    assert defaults(decode_strategy="greedy_search", top_p=0.5) == Sampling(top_p=0.5)


def test_stop_string_helpers() -> None:
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello", ["x"]) is None
    assert held_back("hello wo", ["world"]) == 2
    assert held_back("hello", ["lox", "o!"]) == 2  # "lo" of "lox" beats "o" of "o!"
    assert held_back("abc", ["abc"]) == 0  # a whole match is found by find_stop, never held
    assert held_back("", ["ab"]) == 0


# ------------------------------------------------------------------------------------------ /api/chat
def test_api_chat_streams_the_predictor_answer_for_both_history_forms(
    server: hs.Server, predictor: Predictor
) -> None:
    # a prompt outside the demo task: the pretrained demo model answers task prompts right whatever precedes
    # them, while this answer depends on the exact history, so the check below tells the two history forms apart
    query = "what?"
    want, _ = expected(predictor, [[U1, B1], [U2, B2], [query]])
    doubled, _ = expected(predictor, [[U1, B1], [U2, B2], [query, ""], [query]])  # PaddleNLP's quirk
    assert want and want != doubled
    for history in (
        [U1, B1, U2, B2],
        json.dumps([{"role": "user", "utterance": t} for t in (U1, B1, U2, B2)]),
    ):
        status, lines = chat(
            server, {"context": query, "history": history, **GREEDY, "max_length": MAX, "min_length": 1}
        )
        assert status == 200
        assert all(line["error_code"] == 0 and line["error_msg"] == "Success" for line in lines)
        assert all(line["result"]["response"]["role"] == "bot" for line in lines)
        pieces = [line["result"]["response"]["utterance"] for line in lines]
        assert all(pieces) and len(pieces) > 1  # streamed in pieces, empty ones skipped
        assert "".join(pieces) == want


def test_api_chat_refuses_over_the_limit_and_bad_input(server: hs.Server) -> None:
    total = SRC + MAX
    status, lines = chat(
        server, {"context": QUERY, "history": [], **GREEDY, "src_length": SRC, "max_length": MAX + 1}
    )
    assert status == 400 and len(lines) == 1
    assert lines[0]["error_code"] == 1 and f"limit of {total} tokens" in lines[0]["error_msg"]
    status, lines = chat(server, {"context": QUERY, "history": [U1], **GREEDY})
    assert status == 400 and lines[0]["error_code"] == 1 and "even number" in lines[0]["error_msg"]
    status, lines = chat(server, {"history": []})
    assert status == 400 and "'context'" in lines[0]["error_msg"]
    status, lines = chat(server, {"context": QUERY}, key="wrong")
    assert status == 401 and lines[0]["error_code"] == 1 and "API key" in lines[0]["error_msg"]
    # a smaller request src_length left-truncates the prompt (PaddleNLP) instead of refusing it
    status, lines = chat(
        server, {"context": QUERY, "history": [U1, B1], **GREEDY, "src_length": 8, "max_length": 4}
    )
    assert status == 200 and all(line["error_code"] == 0 for line in lines)


# ------------------------------------------------------------------------------------------ OpenAI client
def test_openai_chat_and_completion(client: openai.OpenAI, predictor: Predictor) -> None:
    messages = [
        {"role": "user", "content": U1},
        {"role": "assistant", "content": B1},
        {"role": "user", "content": QUERY},
    ]
    out = client.chat.completions.create(model="model", messages=messages, temperature=0, max_tokens=MAX)
    want, tokens = expected(predictor, [[U1, B1], [QUERY]])
    assert out.object == "chat.completion" and out.model == "model" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want
    assert out.choices[0].finish_reason == ("length" if len(tokens) == MAX else "stop")
    assert out.usage.prompt_tokens == len(predictor.prompt_ids([[U1, B1], [QUERY]]))
    assert out.usage.completion_tokens == len(tokens)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    system = [{"role": "system", "content": "Answer in words."}, *messages]
    out = client.chat.completions.create(model="model", messages=system, max_tokens=4, user="someone")
    assert out.usage.prompt_tokens == len(
        predictor.prompt_ids([[U1, B1], [QUERY]], {"system": "Answer in words."})
    )

    done = client.completions.create(model="model", prompt=QUERY, max_tokens=MAX, temperature=0)
    want, tokens = expected_raw(predictor, QUERY)
    assert done.object == "text_completion" and done.choices[0].text == want
    assert done.usage.prompt_tokens == len(predictor.tokenizer.encode(QUERY))
    assert done.usage.completion_tokens == len(tokens)
    capped = client.completions.create(model="model", prompt=QUERY, max_tokens=10_000)
    assert capped.usage.completion_tokens <= MAX  # max_tokens is capped at the server's max_length


def test_openai_streaming_with_usage(client: openai.OpenAI, predictor: Predictor) -> None:
    messages = [{"role": "user", "content": QUERY}]
    want, tokens = expected(predictor, [[QUERY]])
    chunks = list(
        client.chat.completions.create(
            model="model",
            messages=messages,
            max_tokens=MAX,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if len(tokens) == MAX else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(tokens)
    assert chunks[-1].usage.prompt_tokens == len(predictor.prompt_ids(QUERY))
    assert all(c.usage is None for c in chunks[:-1])

    want, _ = expected_raw(predictor, QUERY)
    parts = list(client.completions.create(model="model", prompt=QUERY, max_tokens=MAX, stream=True))
    assert "".join(p.choices[0].text for p in parts) == want
    assert parts[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_stop_strings(client: openai.OpenAI, predictor: Predictor) -> None:
    full, _ = expected_raw(predictor, QUERY)
    assert len(full) >= 8, full
    mid = len(full) // 2
    stop = full[mid : mid + 3]
    want = full[: full.find(stop)]
    out = client.completions.create(model="model", prompt=QUERY, max_tokens=MAX, stop=[stop, "@@@@"])
    assert out.choices[0].text == want and stop not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < MAX
    parts = list(
        client.completions.create(model="model", prompt=QUERY, max_tokens=MAX, stop=stop, stream=True)
    )
    assert "".join(p.choices[0].text for p in parts) == want
    assert parts[-1].choices[0].finish_reason == "stop"


def test_openai_errors(server: hs.Server, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": QUERY}]
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        wrong.chat.completions.create(model="model", messages=messages)
    assert auth.value.status_code == 401 and "API key" in auth.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="model", messages=messages, temperature="hot")  # type: ignore[arg-type]
    assert (
        bad.value.status_code == 400
        and bad.value.param == "temperature"
        and "'temperature'" in bad.value.message
    )
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="model", messages=messages, n=2)
    assert bad.value.param == "n"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="model", prompt=QUERY, extra_body={"top_k": -1})
    assert bad.value.param == "top_k"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="model", prompt=" ".join(["spell: 12"] * 40))
    assert bad.value.code == "context_length_exceeded" and f"limit of {SRC}" in bad.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert missing.value.code == "model_not_found"

    status, data = hs.request(server.port, "POST", "/v1/chat/completions", raw=b'{"messages": [', key=KEY)
    assert status == 400 and "malformed JSON" in json.loads(data)["error"]["message"]
    status, data = hs.request(server.port, "POST", "/v1/completions", raw=b"x" * 70_000, key=KEY)
    assert status == 413 and "65536 bytes" in json.loads(data)["error"]["message"]
    status, data = hs.request(server.port, "GET", "/v1/nothing", key=KEY)
    assert status == 404 and json.loads(data)["error"]["message"] == "unknown route GET /v1/nothing"
    status, data = hs.request(server.port, "GET", "/health")  # open without the key
    assert status == 200 and json.loads(data)["status"] == "ok"


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["model"]
    assert client.models.retrieve("model").id == "model"


def test_concurrent_requests_see_only_their_own_text(client: openai.OpenAI, predictor: Predictor) -> None:
    prompts = [f"spell: {n}" for n in (5, 17, 342, 808, 61, 99)]
    wants = [expected_raw(predictor, p)[0] for p in prompts]
    assert len(set(wants)) > 1

    def ask(i: int) -> str:
        if i % 2:
            parts = client.completions.create(model="model", prompt=prompts[i], max_tokens=MAX, stream=True)
            return "".join(p.choices[0].text for p in parts)
        return client.completions.create(model="model", prompt=prompts[i], max_tokens=MAX).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, range(len(prompts)))) == wants
