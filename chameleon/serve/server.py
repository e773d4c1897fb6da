"""A trained run behind HTTP: an OpenAI-style completions endpoint whose concurrent requests are decoded together,
one adapter per group of prompts (the paper's inference-time clusters, formed from live requests).

    python -m chameleon serve --run results/cpu/lm/runs/<run> --port 8000 --window-ms 20 --max-batch 32
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": ["The history of Rome", "Photosynthesis is"], "max_tokens": 16}'

How a batch forms: the first waiting request opens a window of --window-ms; every request that arrives in it
joins, up to --max-batch prompts. The batch is grouped as `Adapter.generate` groups (--group: route, kmeans,
single, serving's words for the batchings: regimes.GROUPINGS), one adapter per group, and decoded in one pass (the
kit's batched decoding); while it decodes, the next requests queue up and form the next batch. Each choice names
its group. Requests with other sampling settings (temperature, top_p, stop) are decoded apart in the same round. A
request waits in a bounded queue (--max-queue requests): when it is full the server answers 503 at once. Bad requests
get a 4xx with a message and never reach the model; an error while decoding fails that batch's requests (500), not the server.

Request fields: prompt (a string or a list of strings, required), max_tokens (1..--max-tokens, default 16),
temperature (0 = greedy, the default), top_p, stop (a string or a list of strings). The OpenAI fields it does not
serve (UNSERVED: stream, n, best_of, logprobs, echo, the penalties, logit_bias, suffix) are accepted at their
default value only, and refused with a 400 naming the field otherwise; other fields (model, user) are ignored. FastAPI and uvicorn are imported when a server is
built, so the command line stays fast.
"""
import asyncio  # no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime
import itertools
import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

LIMITS = {  # name: (default, smallest allowed, what it bounds): `serve` options and create_app's arguments
    "window_ms": (20, 0, "how long the first waiting request waits for others to join its batch, in ms"),
    "max_batch": (32, 1, "most prompts decoded together"),
    "max_queue": (64, 1, "most requests waiting for a batch; more get 503"),
    "max_tokens": (256, 1, "largest max_tokens a request may ask for"),
    "max_body": (1 << 16, 1, "largest request body, in bytes")}
DEFAULT_MAX_TOKENS = 16  # as OpenAI's completions endpoint
# OpenAI completions fields this server does not serve: (the one value it accepts, why); any other value is a 400,
# never silently ignored
UNSERVED = {"stream": (False, "answers come whole"),
            "n": (1, "one choice per prompt is decoded (send the prompt n times for n samples)"),
            "best_of": (1, "no candidates are ranked"),
            "logprobs": (None, "token log-probabilities are not returned"),
            "echo": (False, "the prompt is not repeated in the answer"),
            "presence_penalty": (0, "no penalties are applied in decoding"),
            "frequency_penalty": (0, "no penalties are applied in decoding"),
            "logit_bias": (None, "no logit bias is applied in decoding"),
            "suffix": (None, "no text is inserted after the answer")}


class BadRequest(ValueError):
    """A request the server refuses: its message goes to the client with `status`."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Pending:
    """One request waiting for its batch."""
    prompts: list[str]
    max_tokens: int
    sampling: dict  # Adapter.generate's sampling arguments; requests decode together only when these agree
    future: asyncio.Future | None = None  # set by Batcher.submit


def parse(body: bytes, limits: dict) -> Pending:
    """A request body as a Pending request, or BadRequest naming what is wrong and how to fix it."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"the body is not valid JSON ({err}); send a JSON object like "
                         '{"prompt": "Hello", "max_tokens": 16}') from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object with a \"prompt\" field")
    if "prompt" not in data:
        raise BadRequest("missing \"prompt\": give a string or a list of strings")
    prompts = data["prompt"] if isinstance(data["prompt"], list) else [data["prompt"]]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise BadRequest("\"prompt\" must be a non-empty string or a non-empty list of non-empty strings")
    if len(prompts) > limits["max_batch"]:
        raise BadRequest(f"{len(prompts)} prompts in one request; this server decodes at most "
                         f"{limits['max_batch']} together (--max-batch): split the request")
    max_tokens = _number(data, "max_tokens", int, DEFAULT_MAX_TOKENS, 1, limits["max_tokens"])
    for name, (default, why) in UNSERVED.items():
        if name in data and data[name] != default:
            raise BadRequest(f"\"{name}\": {json.dumps(data[name])} is not served: {why}; send "
                             f"\"{name}\": {json.dumps(default)} or leave it out")
    temperature = _number(data, "temperature", float, 0.0, 0.0, 10.0)
    top_p = _number(data, "top_p", float, 1.0, 1e-6, 1.0)
    stop = data.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise BadRequest("\"stop\" must be a non-empty string or a list of them")
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    if stop:
        sampling["stop_strings"] = tuple(stop)
    return Pending(prompts, max_tokens, sampling)


def _number(data: dict, name: str, kind: type, default, low, high):
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"\"{name}\" must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not low <= value <= high:
        raise BadRequest(f"\"{name}\" must lie in [{low}, {high}], got {value}")
    return kind(value)


class Batcher:
    """The bounded queue and the one worker that turns waiting requests into batches."""

    def __init__(self, adapter, group: str, window_ms: int, max_batch: int, max_queue: int):
        self.adapter, self.group = adapter, group
        self.window, self.max_batch = window_ms / 1000, max_batch
        self.queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=max_queue)
        self.carried: Pending | None = None  # a request that did not fit the last batch: it opens the next
        self.ids = itertools.count()

    def submit(self, pending: Pending) -> None:
        pending.future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise BadRequest(f"the server is busy: {self.queue.maxsize} requests are waiting (--max-queue); "
                             "retry shortly", status=503) from None

    async def run(self) -> None:
        while True:
            batch = await self._collect()
            rounds: dict[tuple, list[Pending]] = {}
            for p in batch:
                rounds.setdefault(tuple(sorted(p.sampling.items())), []).append(p)
            for requests in rounds.values():
                await self._decode(requests)

    async def _collect(self) -> list[Pending]:
        first = self.carried or await self.queue.get()
        self.carried, batch, n = None, [first], len(first.prompts)
        deadline = asyncio.get_running_loop().time() + self.window
        while n < self.max_batch:
            try:  # polled, not wait_for(queue.get()): a timeout there can drop an item just taken (Python 3.11)
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                if asyncio.get_running_loop().time() >= deadline:
                    break
                await asyncio.sleep(0.001)
                continue
            if n + len(item.prompts) > self.max_batch:
                self.carried = item
                break
            batch.append(item)
            n += len(item.prompts)
        return batch

    async def _decode(self, requests: list[Pending]) -> None:
        prompts = [p for r in requests for p in r.prompts]
        try:
            results, lengths = await asyncio.to_thread(self._generate, prompts, max(r.max_tokens for r in requests),
                                                       requests[0].sampling)
            start, answers = 0, []
            for r in requests:
                answers.append(self._response(r, results[start:start + len(r.prompts)],
                                              lengths[start:start + len(r.prompts)], len(prompts)))
                start += len(r.prompts)
        except Exception as err:  # this batch fails, the server goes on
            for r in requests:
                if not r.future.done():
                    r.future.set_exception(err)
            return
        for r, answer in zip(requests, answers):
            if not r.future.done():  # the client may have gone
                r.future.set_result(answer)

    def _generate(self, prompts: list[str], max_tokens: int, sampling: dict):
        """In the worker thread, the only one that touches the model and the tokenizer."""
        results = self.adapter.generate(prompts, max_new_tokens=max_tokens, group=self.group, **sampling)
        L = self.adapter.cfg.max_length
        return results, [len(self.adapter.tokenizer(p)["input_ids"][-L:]) for p in prompts]

    def _response(self, request: Pending, results, prompt_lengths: list[int], batch_size: int) -> dict:
        choices = []
        for i, r in enumerate(results):
            tokens = r.tokens[:request.max_tokens]  # rows are independent: the first k tokens are the k-token answer
            text = self.adapter.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = [text.find(s) for s in request.sampling.get("stop_strings", ()) if s in text]
            choices.append({"index": i, "text": text[:min(cut)] if cut else text,  # as OpenAI: without the stop
                            "finish_reason": "stop" if r.stopped and len(r.tokens) <= request.max_tokens else "length",
                            "group": r.group, "group_size": r.group_size, "completion_tokens": len(tokens)})
        completion = sum(c["completion_tokens"] for c in choices)
        return {"id": f"cmpl-{next(self.ids)}", "object": "text_completion", "created": int(time.time()),
                "model": self.adapter.run.name if self.adapter.run else self.adapter.cfg.regime,
                "choices": choices, "batch": {"prompts": batch_size, "grouping": self.group},
                "usage": {"prompt_tokens": sum(prompt_lengths), "completion_tokens": completion,
                          "total_tokens": sum(prompt_lengths) + completion}}


def create_app(adapter, group: str = "route", **limits):
    """The FastAPI application serving `adapter` (a `serving.Adapter`); limits: LIMITS' names."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    unknown = set(limits) - set(LIMITS)
    if unknown:
        raise ValueError(f"unknown server limits {sorted(unknown)}; choose among {list(LIMITS)}")
    limits = {name: limits.get(name, default) for name, (default, _, _) in LIMITS.items()}
    if why := adapter.adapted.unservable():
        raise ValueError(f"{adapter.cfg.regime} cannot be served as loaded: {why}")

    @asynccontextmanager
    async def lifespan(app):
        app.state.batcher = Batcher(adapter, group, limits["window_ms"], limits["max_batch"], limits["max_queue"])
        worker = asyncio.create_task(app.state.batcher.run())
        yield
        worker.cancel()

    app = FastAPI(title="ChamaleonLLM kit", lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        retry = {"Retry-After": "1"} if status == 503 else None  # busy: a client may come back in a second
        return JSONResponse({"error": {"message": message, "code": status}}, status_code=status, headers=retry)

    @app.get("/v1/models")
    async def models():
        cfg = adapter.cfg
        return {"object": "list", "data": [{"id": adapter.run.name if adapter.run else cfg.regime, "object": "model",
                                            "regime": cfg.regime, "backbone": cfg.backbone, "grouping": group}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await _read_body(request, limits["max_body"])
            pending = parse(body, limits)
            request.app.state.batcher.submit(pending)
        except BadRequest as err:
            return error(err.status, str(err))
        try:
            return await pending.future
        except Exception as err:  # noqa: BLE001 - the message goes to the client; the server goes on
            return error(500, f"decoding failed: {type(err).__name__}: {err}")

    return app


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the body has {declared} bytes, more than this server's {limit} (--max-body)", status=413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"the body exceeds this server's {limit} bytes (--max-body)", status=413)
    return body


@contextmanager
def background(app, host: str = "127.0.0.1"):
    """Serve `app` from a thread on a free port (bound before the server starts), yielding its base URL; for
    tests, benchmarks and notebooks. The server stops when the block ends."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start; see the log above")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def serve(run, host: str = "127.0.0.1", port: int = 8000, group: str = "route", device: str = "auto", **limits) -> None:
    """Load the run and serve it until interrupted (Ctrl-C)."""
    import uvicorn

    from chameleon.serve.adapter import Adapter

    adapter = Adapter.from_run(run, device=device)
    app = create_app(adapter, group, **limits)
    print(f"serving {adapter.cfg.regime} ({run}) on http://{host}:{port}/v1/completions, grouping {group}")
    uvicorn.run(app, host=host, port=port, log_level="info")
