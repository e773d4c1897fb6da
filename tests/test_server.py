"""`serve`: a real HTTP client against the server on a free localhost port. Concurrent requests are decoded
together, one adapter per group; bad requests get a 4xx and the server goes on; a full queue answers 503."""
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from chameleon.__main__ import main
from chameleon.serve.server import UNSERVED, background, create_app
from chameleon.serve.adapter import Adapter

import conftest  # pytest puts tests/ on sys.path

PROMPTS = ["The history of Rome begins with", "Photosynthesis turns light into", "Hello", "In 1854 the city of",
           "The quick brown fox", "Once upon a time"]


def post(url: str, body, raw: bool = False) -> tuple[int, dict]:
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def adapter(trained_run):
    return Adapter.from_run(trained_run("chameleon", protocol="causal"), device="cpu")


@pytest.fixture(scope="module")
def url(adapter):
    with background(create_app(adapter, group="route", window_ms=300, max_batch=8)) as url:
        yield url


def test_concurrent_requests_are_decoded_together_one_adapter_per_group(adapter, url):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # each client sends one prompt, all at once
        answers = list(pool.map(lambda i: post(url, {"prompt": PROMPTS[i], "max_tokens": 2 + i}), range(len(PROMPTS))))
    assert [status for status, _ in answers] == [200] * len(PROMPTS)
    assert max(body["batch"]["prompts"] for _, body in answers) > 1  # the window gathered several requests
    for i, (_, body) in enumerate(answers):
        choice = body["choices"][0]
        assert choice["completion_tokens"] <= 2 + i and {"group", "group_size", "text"} <= choice.keys()
    # one request with several prompts is one batch: the answers of Adapter.generate on that batch, group by group
    prompts = PROMPTS[:2] + conftest.line_per_cluster(adapter)
    status, body = post(url, {"prompt": prompts, "max_tokens": 5})
    ref = adapter.generate(prompts, max_new_tokens=5, group="route")
    assert status == 200 and body["batch"]["prompts"] == len(prompts)
    assert [(c["group"], c["text"].strip()) for c in body["choices"]] == [(r.group, r.text) for r in ref]
    assert len({c["group"] for c in body["choices"]}) > 1
    assert body["usage"]["completion_tokens"] == sum(len(r.tokens) for r in ref)
    status, body = post(url, {"prompt": "Hello", "max_tokens": 4, "temperature": 0.8, "top_p": 0.9, "model": "x"})
    assert status == 200 and body["choices"][0]["completion_tokens"] <= 4
    # a stop string ends the answer, and is left out of its text (as OpenAI's endpoint does)
    greedy = adapter.generate(["Hello"], max_new_tokens=8)[0]
    text, stop = adapter.tokenizer.decode(greedy.tokens), adapter.tokenizer.decode(greedy.tokens[2:4])
    status, body = post(url, {"prompt": "Hello", "max_tokens": 8, "stop": stop})
    assert (status, body["choices"][0]["text"], body["choices"][0]["finish_reason"]) == (200, text[:text.find(stop)], "stop")


BAD = [
    ({"max_tokens": 3}, 400, "missing \"prompt\""),
    ({"prompt": 42}, 400, "non-empty string"),
    ({"prompt": ["ok", ""]}, 400, "non-empty string"),
    ({"prompt": ["x"] * 9}, 400, "split the request"),
    ({"prompt": "Hi", "max_tokens": 100000}, 400, "\"max_tokens\" must lie in"),
    ({"prompt": "Hi", "max_tokens": "ten"}, 400, "must be an integer"),
    ({"prompt": "Hi", "max_tokens": 2.5}, 400, "must be an integer"),
    ({"prompt": "Hi", "temperature": -1}, 400, "\"temperature\" must lie in"),
    ({"prompt": "Hi", "stop": 3}, 400, "\"stop\" must be"),
    ({"prompt": "Hi", "stream": True}, 400, "\"stream\": true is not served"),
    *[({"prompt": "Hi", name: value}, 400, f"\"{name}\": {json.dumps(value)} is not served")
      for name, value in [("n", 3), ("best_of", 2), ("logprobs", 5), ("echo", True), ("presence_penalty", 0.5),
                          ("frequency_penalty", -1), ("logit_bias", {"50256": -100}), ("suffix", "!")]],
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (json.dumps({"prompt": "x" * 70000}).encode(), 413, "--max-body"),
]


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_goes_on(url):
    for body, status, message in BAD:
        got, answer = post(url, body, raw=isinstance(body, bytes))
        assert (got, message in answer["error"]["message"]) == (status, True), (body, answer)
    assert post(url, {"prompt": "Hello", "max_tokens": 1})[0] == 200
    # each unserved field at its one served value is accepted
    assert post(url, {"prompt": "Hello", "max_tokens": 1, **{k: v for k, (v, _) in UNSERVED.items()}})[0] == 200


class Held:
    """An adapter whose decoding waits until released: requests pile up behind it."""

    def __init__(self, adapter):
        self.adapter, self.entered, self.release = adapter, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.adapter, name)

    def generate(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(30)
        return self.adapter.generate(*args, **kwargs)


def test_a_full_queue_answers_503_at_once(adapter):
    held = Held(adapter)
    app = create_app(held, window_ms=0, max_queue=1)
    with background(app) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, url, {"prompt": "Hello", "max_tokens": 2})  # being decoded
        assert held.entered.wait(30)
        second = pool.submit(post, url, {"prompt": "Hi", "max_tokens": 2})  # waiting in the queue
        for _ in range(500):
            if app.state.batcher.queue.qsize() == 1:
                break
            time.sleep(0.01)
        status, body = post(url, {"prompt": "Hey", "max_tokens": 2})
        assert status == 503 and "--max-queue" in body["error"]["message"]
        held.release.set()
        assert first.result()[0] == second.result()[0] == 200


def test_cli_serve_refuses_a_missing_run(tmp_path, capsys):
    assert main(["serve", "--run", str(tmp_path / "nowhere"), "--port", "0"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--run", str(tmp_path), "--window-ms", "-1"])
