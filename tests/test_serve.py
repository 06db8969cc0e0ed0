"""phi3lora serve through the real `openai` client against a server on 127.0.0.1: chat and completions, streaming
and not, every bad request, greedy replies equal alone / in a mixed-adapter batch / through chat.py, and many
concurrent clients. The gathered multi-adapter layer against per-adapter lora layers, and the engine's per-row
cache against generate() where the sliding window cuts."""
import io
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from helpers import small_tiny, small_tiny_dir  # noqa: E402
from serve_helpers import make_adapter, running_server  # noqa: E402

from phi3lora import lora  # noqa: E402
from phi3lora.cli import chat  # noqa: E402
from phi3lora.phi3mini import Tokenizer, generate  # noqa: E402
from phi3lora.serve import multi_lora  # noqa: E402
from phi3lora.serve.engine import Engine, Request, Sampling  # noqa: E402

PROMPTS = ["hello", "what is lora?", "a much longer prompt that goes on for a while", "x", "tell me more",
           "why", "ok then", "bye now"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    a = make_adapter(root / "a", seed=1, targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens",
                                                  "lm_head"))  # the demo's targets: embedding and head too
    b = make_adapter(root / "b", seed=2, targets=("qkv_proj", "down_proj"), r=2,
                     enable_lora=[True, False, True])  # fused qkv with per-part LoRA (q and v only), another rank
    return {"a": str(a), "b": str(b)}


@pytest.fixture(scope="module")
def server(adapters):
    with running_server(list(adapters.items()), max_batch=8, max_queue=64) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def ask(client, model, prompt, max_tokens=12, **kw):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                       max_tokens=max_tokens, temperature=0, **kw)
    return r


def post(url, body: bytes | dict, path="/v1/chat/completions"):
    """(status, parsed JSON) of a raw POST: the errors the openai client would hide."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ----- the API --------------------------------------------------------------------------------------------------
def test_models_lists_base_and_adapters(client):
    assert [m.id for m in client.models.list().data] == ["base", "a", "b"]


def test_chat_completion_fields(client):
    r = ask(client, "a", "hello", max_tokens=5)
    assert r.object == "chat.completion" and r.model == "a"
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(Tokenizer.tiny().encode_chat([{"role": "user", "content": "hello"}],
                                                                      add_generation_prompt=True))
    assert 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_length_and_stop_finish_reasons(client):
    r = ask(client, "base", "hello", max_tokens=6)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    text = r.choices[0].message.content
    stop = text[len(text) // 2:][:3]
    assert stop, text
    cut = ask(client, "base", "hello", max_tokens=6, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(stop)]


def test_streaming_chat_equals_the_whole_reply(client):
    whole = ask(client, "b", "tell me more", max_tokens=10).choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="b", messages=[{"role": "user", "content": "tell me more"}], max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # it arrived in pieces
    assert "".join(pieces) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_streaming_and_not(client):
    r = client.completions.create(model="a", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    streamed = list(client.completions.create(model="a", prompt="Once upon a time", max_tokens=8, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_seeded_sampling_repeats_and_seeds_differ(client):
    def sample(seed):
        return client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=12, temperature=1.0, top_p=0.9, seed=seed)
    first, again, other = sample(7), sample(7), sample(8)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content


# ----- the same greedy reply however it runs -----------------------------------------------------------------------
def test_greedy_alone_equals_mixed_batch_equals_chat_py(client, adapters, server):
    models = ["base", "a", "b", "base", "a", "b", "a", "base"]
    alone = [ask(client, m, p).choices[0].message.content for m, p in zip(models, PROMPTS)]
    steps = server[1].steps
    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(lambda mp: ask(client, *mp).choices[0].message.content, zip(models, PROMPTS)))
    assert batched == alone
    assert server[1].steps - steps < 8 * 11  # they decoded together (alone: 11 steps each)
    for m, p, reply in list(zip(models, PROMPTS, alone))[:3]:
        argv = ["--model", small_tiny_dir(), "--device", "cpu", "--prompt", p, "--max-new-tokens", "12"]
        out, err = io.StringIO(), io.StringIO()
        assert chat.main(argv + (["--adapter", adapters[m]] if m != "base" else []), stdout=out, stderr=err) == 0
        assert out.getvalue().strip() == reply.strip(), (m, p)


def test_sixteen_clients_four_requests_each(client):
    def user(i):
        return [ask(client, ["base", "a", "b"][(i + j) % 3], f"question {i}.{j}", max_tokens=4)
                for j in range(4)]
    with ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(user, range(16)) for r in rs]
    assert len(results) == 64
    assert all(r.usage.completion_tokens >= 1 and r.choices[0].finish_reason for r in results)


# ----- bad requests: OpenAI-style errors, and the server goes on -------------------------------------------------
BAD = [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"model": "base", "messages": [{"role": "user", "content": "word " * 2000}]}, 400),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
    ({"model": "base", "messages": []}, 400),
    ({"model": "base", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400),
]


@pytest.mark.parametrize("body,status", BAD, ids=["malformed", "not-object", "unknown-model", "too-long",
                                                  "max-tokens-0", "negative-temperature", "temperature-type",
                                                  "no-messages", "bad-role", "n-2"])
def test_bad_request_is_an_openai_error_and_the_server_goes_on(server, client, body, status):
    code, data = post(server[0], body)
    assert code == status, data
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]
    assert ask(client, "base", "still there?", max_tokens=2).usage.completion_tokens >= 1


def test_nan_temperature_and_the_openai_client_errors(server, client):
    # json.dumps writes NaN as the bare token NaN, which Python's JSON reader accepts: it must still be refused
    code, data = post(server[0], b'{"model": "base", "messages": [{"role": "user", "content": "hi"}], '
                                 b'"temperature": NaN}')
    assert code == 400 and "temperature" in data["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        ask(client, "missing", "hi")
    with pytest.raises(openai.BadRequestError):
        ask(client, "base", "hi", max_tokens=0)
    code, data = post(server[0], b'{"model": "base", "prompt": "hi", "temperature": Infinity}', "/v1/completions")
    assert code == 400 and "temperature" in data["error"]["message"]


def test_full_queue_answers_429(adapters):
    with running_server([], max_batch=1, max_queue=1) as (url, engine):
        body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}
        with ThreadPoolExecutor(6) as pool:
            codes = sorted(c for c, _ in pool.map(lambda _: post(url, body), range(6)))
        assert 200 in codes and 429 in codes, codes
        assert post(url, body)[0] == 200  # and it recovers


def test_disconnected_stream_frees_its_row(server, client):
    engine = server[1]
    stream = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "go on"}],
                                            max_tokens=200, temperature=0, stream=True)
    next(iter(stream))
    stream.close()  # the client goes away mid-reply
    deadline = time.monotonic() + 20
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.running


def test_disconnected_plain_request_frees_its_row(server):
    """A client that goes away before a (non-streaming) reply is done: its row is freed long before max_tokens."""
    import socket
    from urllib.parse import urlparse

    engine, url = server[1], urlparse(server[0])
    body = json.dumps({"model": "base", "messages": [{"role": "user", "content": "go"}], "max_tokens": 900,
                       "ignore_eos": True}).encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 20
        while not engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        (req,) = engine.running
    deadline = time.monotonic() + 20
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.running and req.cancelled and len(req.tokens) < 900


# ----- the pieces ---------------------------------------------------------------------------------------------------
def test_gathered_layer_equals_each_adapters_lora_layers(adapters):
    """One batch, rows on the base and on each adapter, against the model with that adapter loaded alone."""
    model = small_tiny(seed=0).eval()
    factors = [multi_lora.adapter_factors(model, lambda m, d=d: lora.load_adapter(m, d)) for d in adapters.values()]
    x = torch.randint(0, 32000, (3, 7))
    with torch.no_grad():
        expect = [model(x[:1])]
        for d, i in zip(adapters.values(), (1, 2)):
            ref = small_tiny(seed=0).eval()
            lora.load_adapter(ref, d)
            expect.append(ref(x[i:i + 1]))
        rows = multi_lora.install(model, factors)
        rows.set([-1, 0, 1], "cpu")
        got = model(x)
    for i in range(3):
        torch.testing.assert_close(got[i:i + 1], expect[i], atol=1e-5, rtol=1e-5)
    assert (expect[1] - expect[0]).abs().max() > 1e-2  # the adapters do change the logits


@pytest.mark.slow  # the tiny model's every projection through Triton's interpreter: ~30 s on 2 cores
def test_triton_gathered_kernel_gives_the_reference_logits(adapters):
    """With use_kernel (always on CUDA) the wrapped layers call kernels.gathered_lora; here under Triton's
    interpreter, against the torch reference path."""
    from phi3lora import kernels
    assert "gathered_lora" in kernels.__all__
    model = small_tiny(seed=0).eval()
    factors = [multi_lora.adapter_factors(model, lambda m, d=d: lora.load_adapter(m, d)) for d in adapters.values()]
    rows = multi_lora.install(model, factors)
    rows.set([1, -1, 0], "cpu")
    x = torch.randint(0, 32000, (3, 5))
    with torch.no_grad():
        ref = model(x)
        for m in model.modules():
            if isinstance(m, multi_lora.MultiLoraLinear):
                m.use_kernel = True
        got = model(x)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_engine_rows_match_generate_when_the_window_cuts():
    """A sliding window of 8 slots, prompts of different lengths joining at different steps: each row's tokens
    are generate()'s for its prompt alone."""
    model = small_tiny(seed=0, sliding_window=8).eval()
    tok = Tokenizer.tiny()
    engine = Engine(model, tok, max_batch=4).start()
    texts = ("a b c d e f g h i j k", "hi", "one two three", "the longest prompt of all here")
    prompts = [tok.encode(t) for t in texts]
    out, done = [[] for _ in prompts], [threading.Event() for _ in prompts]
    try:
        for i, ids in enumerate(prompts):
            def emit(ev, i=i):
                if ev[0] != "text":
                    done[i].set()
            out[i] = Request(ids, -1, Sampling(max_tokens=12 + 3 * i), emit, tok, "cpu")
        for req in out[:2]:
            engine.submit(req)
        deadline = time.monotonic() + 30
        while engine.steps < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(engine.running) == 2  # the last two join while these two decode
        for req in out[2:]:
            engine.submit(req)
        assert all(d.wait(60) for d in done)
        assert engine.steps < sum(r.sampling.max_tokens for r in out)  # some steps served several rows
    finally:
        engine.close()
    for ids, req in zip(prompts, out):
        assert req.tokens == generate(model, ids, req.sampling.max_tokens, stop_ids=sorted(engine.stop_ids))


# ----- start-up errors: one line naming the problem, exit 2, before any port is opened ------------------------------
def test_start_up_errors_are_clear(tmp_path, capsys, monkeypatch):
    import uvicorn

    from phi3lora.cli import serve

    def never(*a, **kw):
        raise AssertionError("the server started")
    monkeypatch.setattr(uvicorn, "run", never)
    model = small_tiny(seed=0, hidden_size=32, intermediate_size=96)  # an adapter for another shape
    config = lora.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv_proj"])
    lora.inject(model, config)
    lora.save_adapter(model, tmp_path / "other", config)
    # variants that change more than a low-rank term: refused by name, not served wrongly
    make_adapter(tmp_path / "dora", use_dora=True)
    make_adapter(tmp_path / "pissa", targets=("o_proj",), init_lora_weights="pissa")
    make_adapter(tmp_path / "saved", targets=("o_proj",), modules_to_save=("lm_head",))
    base = ["--model", small_tiny_dir(), "--device", "cpu"]
    cases = [(["--adapter", "nope"], "NAME=DIR"),
             (["--adapter", f"d={tmp_path / 'dora'}"], "DoRA adapter (use_dora)"),
             (["--adapter", f"p={tmp_path / 'pissa'}"], "--export-peft"),
             (["--adapter", f"s={tmp_path / 'saved'}"], "lm_head: modules_to_save"),
             (["--adapter", f"x={tmp_path / 'missing'}"], "missing"),
             (["--adapter", f"x={tmp_path / 'other'}"], "shape"),
             (["--adapter", f"base={tmp_path / 'other'}", "--name", "base"], "must differ")]
    for extra, words in cases:
        assert serve.main(base + extra) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
