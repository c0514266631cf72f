"""Serving through Ray Serve on a real two-node local cluster: same answers, adapter affinity, failover.

One cluster per module (starting it takes most of the time); the test that kills a replica runs last.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from gateway.settings import Settings
from tests.conftest import RunningServer
from tests.e2e.conftest import ADMIN
from tests.ray.conftest import ADAPTERS, RayGateway, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MODELS = ("tiny", *(f"tiny+{name}" for name in ADAPTERS))
HEADER = "x-peft-gateway-replica"
#: The tiny model's context here: a stream ``ignore_eos`` up to it runs far longer than any test waits.
CONTEXT = 16384


@pytest.fixture(scope="module")
def ray_settings(ray_settings: Settings) -> Settings:
    """The shared cluster settings (tests/ray/conftest.py) with a context no test's stream reaches."""
    tiny = ray_settings.models["tiny"].model_copy(update={"context_length": CONTEXT})
    return ray_settings.model_copy(update={"models": {"tiny": tiny}})


def routed_holders(gateway: RayGateway, model_id: str) -> set[str]:
    """The engine replicas that Serve's controller last told the routers hold ``model_id``.

    A replica reports the model ids it serves to the controller, which broadcasts the running replicas
    (with their ids) to every router over its long poll; this reads that broadcast (its current
    snapshot: ``listen_for_change`` answers at once for a snapshot id it does not have).
    """
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    from ray.serve._private.long_poll import LongPollNamespace

    from gateway.cluster.deploy import APP_NAME

    controller = gateway.ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    key = (LongPollNamespace.DEPLOYMENT_TARGETS, DeploymentID(name="EngineReplica", app_name=APP_NAME))
    updates = gateway.ray.get(controller.listen_for_change.remote({key: -1}), timeout=60)
    return {
        replica.replica_id.to_full_id_str()
        for replica in updates[key].object_snapshot.running_replicas
        if model_id in replica.multiplexed_model_ids
    }


def wait_routed(gateway: RayGateway, model_id: str, owner: str, timeout: float = 120.0) -> None:
    """Until the routers have been told that ``owner``, and only it, holds ``model_id``."""
    deadline = time.monotonic() + timeout
    while (holders := routed_holders(gateway, model_id)) != {owner}:
        assert time.monotonic() < deadline, f"{model_id} is routed to {holders}, not {owner}"
        assert not holders - {owner}, f"{model_id} was loaded on another replica too: {holders}"
        time.sleep(0.05)


def chat(url: str, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def sse_payloads(url: str, path: str, body: dict[str, Any]) -> tuple[httpx.Headers, list[Any]]:
    """The ``data:`` payloads of a stream, with the per-response ``id`` and ``created`` removed.

    Logprobs are compared to 3 decimals: another process may sum in another order (last-bit noise).
    """
    payloads: list[Any] = []
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                payloads.append(data)
                continue
            payload = json.loads(data, parse_float=lambda text: round(float(text), 3))
            payload.pop("id", None)
            payload.pop("created", None)
            payloads.append(payload)
        return response.headers, payloads


@pytest.fixture(scope="module")
def single(start_server: Any, ray_settings: Settings) -> RunningServer:
    """The same settings served in one process: the reference answers."""
    server: RunningServer = start_server(ray_settings)
    return server


@pytest.fixture(scope="module")
def expected(single: RunningServer) -> dict[str, str]:
    return {model: answer(chat(single.url, model)) for model in MODELS}


def test_ray_listeners_stay_on_loopback(ray_gateway: RayGateway) -> None:
    psutil = pytest.importorskip("psutil")
    listeners = [
        (process.name(), conn.laddr.ip, conn.laddr.port)
        for process in psutil.Process().children(recursive=True)
        for conn in _connections(process)
        if conn.status == psutil.CONN_LISTEN
    ]
    assert listeners, "expected the Ray processes' listening sockets"
    exposed = [entry for entry in listeners if entry[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"Ray listeners outside loopback: {exposed}"


def _connections(process: Any) -> list[Any]:
    try:
        return list(process.net_connections(kind="inet"))
    except Exception:  # the process ended meanwhile
        return []


def test_requests_stick_to_the_replica_that_first_loaded_their_adapter(ray_gateway: RayGateway) -> None:
    # Warm-up: a replica tells Serve's controller which ids it holds, and the controller tells the
    # ingress's router, asynchronously. On two busy cores that took over a second in CI, and a second
    # request sent sooner went to the other replica, which then loaded the adapter too (two holders
    # split the traffic). So after each name's first request the test waits until the controller has
    # broadcast its replica as the name's only holder; the second request then goes there too.
    owners = {}
    for name in ADAPTERS:
        owners[name] = chat(ray_gateway.url, f"tiny+{name}").headers[HEADER]
        wait_routed(ray_gateway, f"tiny+{name}", owners[name])
        assert chat(ray_gateway.url, f"tiny+{name}").headers[HEADER] == owners[name]
    served: dict[str, Counter[str]] = {name: Counter() for name in ADAPTERS}
    lock = threading.Lock()

    def client(names: list[str]) -> None:
        for name in names * 5:
            replica = chat(ray_gateway.url, f"tiny+{name}", max_tokens=2).headers[HEADER]
            with lock:
                served[name][replica] += 1

    threads = [threading.Thread(target=client, args=([a, b],)) for a, b in (ADAPTERS[:2], ADAPTERS[2:])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in ADAPTERS:
        total = sum(served[name].values())
        assert total == 5
        assert served[name][owners[name]] / total >= 0.95, (name, owners[name], served[name])
    assert len(set(owners.values())) == 2, f"both replicas should hold adapters: {owners}"


def test_greedy_answers_equal_single_process(ray_gateway: RayGateway, expected: dict[str, str]) -> None:
    assert len(set(expected.values())) == len(MODELS), "each adapter must change the answer"
    for model in MODELS:
        response = chat(ray_gateway.url, model)
        assert answer(response) == expected[model], model
        assert response.headers[HEADER].startswith("SERVE_REPLICA::")


def test_bare_adapter_alias_routes_like_its_full_name(
    ray_gateway: RayGateway, expected: dict[str, str]
) -> None:
    assert answer(chat(ray_gateway.url, "lora-a")) == expected["tiny+lora-a"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {
                "messages": QUESTION,
                "stream_options": {"include_usage": True},
                "logprobs": True,
                "top_logprobs": 2,
            },
        ),
        ("/v1/completions", {"prompt": "Once upon a time", "echo": True}),
    ],
)
def test_streams_carry_the_same_frames_as_single_process(
    ray_gateway: RayGateway, single: RunningServer, path: str, body: dict[str, Any]
) -> None:
    request = {"model": "tiny+lora-b", "max_tokens": 8, "temperature": 0, "stream": True, **body}
    headers, through_ray = sse_payloads(ray_gateway.url, path, request)
    _, direct = sse_payloads(single.url, path, request)
    assert through_ray == direct
    assert through_ray[-1] == "[DONE]"
    assert headers[HEADER].startswith("SERVE_REPLICA::")
    assert headers["cache-control"] == "no-store"


def test_openai_sdk_streams_through_ray(ray_gateway: RayGateway, expected: dict[str, str]) -> None:
    import openai

    client = openai.OpenAI(base_url=ray_gateway.v1, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny+lora-c",
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == expected["tiny+lora-c"]
    assert usage is not None and usage.completion_tokens > 0


def test_models_and_metrics_show_every_replica(ray_gateway: RayGateway) -> None:
    for model in MODELS:
        chat(ray_gateway.url, model, max_tokens=1)
    deadline = time.monotonic() + 30
    while True:
        rows = {row["id"]: row for row in httpx.get(f"{ray_gateway.v1}/models").json()["data"]}
        if all(rows.get(model, {}).get("loaded") for model in MODELS) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(rows[model]["loaded"] for model in MODELS), rows
    assert rows["tiny+lora-a"]["parent"] == "tiny"
    metrics = httpx.get(f"{ray_gateway.url}/metrics").text
    assert "peft_gateway_replicas 2.0" in metrics
    info = [line for line in metrics.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 2 and all('max_lora="16"' in line for line in info)
    assert all("running_lora_adapters=" in line and "waiting_lora_adapters=" in line for line in info)
    assert 'peft_gateway_replica_requests_total{replica="SERVE_REPLICA::' in metrics
    # The ingress's own generation metrics name the model, as single-process serving's do.
    assert 'peft_gateway_time_to_first_token_seconds_count{model="tiny+lora-a"}' in metrics


def test_errors_keep_their_openai_shape(ray_gateway: RayGateway) -> None:
    missing = chat(ray_gateway.url, "nope+org/adapter")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    too_long = chat(ray_gateway.url, "tiny+lora-a", max_tokens=CONTEXT + 1)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    refused = httpx.post(
        f"{ray_gateway.v1}/unload_lora_adapter", json={"model": "tiny+lora-a"}, headers=ADMIN, timeout=30
    )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_in_cluster"


def test_killed_replica_loses_no_request_that_had_not_started(
    ray_gateway: RayGateway, expected: dict[str, str]
) -> None:
    victim = chat(ray_gateway.url, "tiny+lora-d").headers[HEADER]
    wait_routed(ray_gateway, "tiny+lora-d", victim)  # the stream below goes to the victim too
    frames: list[str] = []
    served_by: list[str] = []
    first_token = threading.Event()

    def long_stream() -> None:
        body = {
            "model": "tiny+lora-d",
            "messages": QUESTION,
            "max_tokens": CONTEXT - 64,  # it runs until its replica is killed
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", f"{ray_gateway.v1}/chat/completions", json=body, timeout=120) as response:
            served_by.append(response.headers[HEADER])
            for line in response.iter_lines():
                if line.startswith("data: "):
                    frames.append(line[len("data: ") :])
                    if '"content"' in line:
                        first_token.set()

    streamer = threading.Thread(target=long_stream, daemon=True)
    streamer.start()
    assert first_token.wait(60) and served_by == [victim]
    ray_gateway.ray.kill(ray_gateway.ray.get_actor(victim, namespace="serve"), no_restart=True)
    results = [(model, chat(ray_gateway.url, model)) for _ in range(2) for model in MODELS]
    streamer.join(120)
    assert not streamer.is_alive(), "the stream went on after its replica was killed"
    assert frames[-1] == "[DONE]"
    assert not any('"finish_reason"' in frame and '"finish_reason":null' not in frame for frame in frames)
    assert json.loads(frames[-2])["error"]["code"] == "replica_unavailable"
    for model, response in results:
        assert answer(response) == expected[model], model
    wait_ready(ray_gateway, replicas=2)
    for model in MODELS:
        response = chat(ray_gateway.url, model)
        assert answer(response) == expected[model]
        assert response.headers[HEADER] != victim
