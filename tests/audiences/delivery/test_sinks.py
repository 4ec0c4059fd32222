"""Sinks: JSON lines on disk, Standard Webhooks signatures, Knock's trigger API, the sinks file."""

from __future__ import annotations

import base64
import json
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from http_recorder import HttpRecorder, Reply
from standardwebhooks import Webhook

from audiences.delivery import Delivery, Outcome
from audiences.delivery.sinks import (
    FileSink,
    KnockSink,
    Sink,
    SinkConfigError,
    WebhookSink,
    batch_message_id,
    close_sinks,
    load_sinks,
    parse_retry_after,
    sinks_from_config,
)

SECRET = "whsec_" + base64.b64encode(b"a shared secret of thirty-two b!").decode()


def delivery(number: int, workflow_key: str = "welcome") -> Delivery:
    return Delivery(
        delivery_id=f"dlv-{number}",
        workflow_key=workflow_key,
        payload={"recipients": [f"user-{number}"], "tenant": "acme", "data": {"event": "entered"}},
    )


@pytest.fixture
def recorder():
    with HttpRecorder() as server:
        yield server


@pytest.fixture
def webhook(recorder):
    sink = WebhookSink("webhook", f"{recorder.url}/hooks", SECRET, timeout_seconds=0.5)
    yield sink
    sink.close()


@pytest.fixture
def knock(recorder):
    sink = KnockSink("knock", recorder.url, "sk_test_123", timeout_seconds=0.5)
    yield sink
    sink.close()


# -- file sink ------------------------------------------------------------------------------------


def test_file_sink_appends_one_json_line_per_delivery_creating_folders(tmp_path):
    path = tmp_path / "out" / "nested" / "triggers.jsonl"
    sink = FileSink("file", path)

    assert sink.send([delivery(1), delivery(2)]) == [Outcome.delivered()] * 2
    assert sink.send([delivery(3)]) == [Outcome.delivered()]

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {
        "delivery_id": "dlv-1",
        "workflow_key": "welcome",
        "idempotency_key": "dlv-1",
        "recipients": ["user-1"],
        "tenant": "acme",
        "data": {"event": "entered"},
    }
    assert [line["delivery_id"] for line in lines] == ["dlv-1", "dlv-2", "dlv-3"]


def test_file_sink_is_a_sink_with_no_rate_limit(tmp_path):
    sink = FileSink("file", tmp_path / "t.jsonl")
    assert isinstance(sink, Sink)
    assert (sink.rate_limit_per_second, sink.batch_size) == (None, 500)


def test_file_sink_answers_retry_when_the_file_cannot_be_written(tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    outcomes = FileSink("file", folder).send([delivery(1), delivery(2)])
    assert [outcome.status for outcome in outcomes] == ["retry", "retry"]
    assert "could not write" in outcomes[0].error


def test_file_sink_fails_only_the_delivery_whose_payload_is_not_json(tmp_path):
    path = tmp_path / "t.jsonl"
    broken = Delivery("dlv-x", "welcome", {"data": {"when": datetime(2026, 1, 1)}})
    outcomes = FileSink("file", path).send([delivery(1), broken])
    assert [outcome.status for outcome in outcomes] == ["delivered", "failed"]
    assert [json.loads(line)["delivery_id"] for line in path.read_text().splitlines()] == ["dlv-1"]


# -- webhook sink ---------------------------------------------------------------------------------


def test_webhook_single_delivery_is_signed_and_verifies_with_standard_webhooks(webhook, recorder):
    assert webhook.send([delivery(1)]) == [Outcome.delivered()]

    (request,) = recorder.requests
    assert (request.method, request.path) == ("POST", "/hooks")
    assert request.header("webhook-id") == "dlv-1"
    assert request.header("content-type") == "application/json"
    document = Webhook(SECRET).verify(request.body, request.headers)
    assert document["type"] == "workflow.trigger"
    assert document["timestamp"].endswith("Z")
    assert document["data"] == {
        "workflow_key": "welcome",
        "delivery_id": "dlv-1",
        "recipients": ["user-1"],
        "tenant": "acme",
        "data": {"event": "entered"},
    }


def test_webhook_signature_does_not_verify_with_another_secret(webhook, recorder):
    webhook.send([delivery(1)])
    (request,) = recorder.requests
    other = "whsec_" + base64.b64encode(b"some other secret, same length!!").decode()
    with pytest.raises(Exception, match="signature"):
        Webhook(other).verify(request.body, request.headers)


def test_webhook_raw_string_secret_signs_with_its_utf8_bytes(recorder):
    sink = WebhookSink("webhook", recorder.url, "plain-shared-secret", timeout_seconds=0.5)
    try:
        assert sink.send([delivery(1)]) == [Outcome.delivered()]
    finally:
        sink.close()

    (request,) = recorder.requests
    assert (
        Webhook(b"plain-shared-secret").verify(request.body, request.headers)["data"]["delivery_id"]
        == "dlv-1"
    )


def test_webhook_batch_has_one_request_with_a_list_and_a_stable_id(recorder):
    sink = WebhookSink("webhook", recorder.url, SECRET, timeout_seconds=0.5, batch_size=2)
    try:
        batch = [delivery(1), delivery(2), delivery(3)]
        assert sink.send(batch) == [Outcome.delivered()] * 3
        assert sink.send(batch[:2]) == [Outcome.delivered()] * 2  # a retry of the first batch
    finally:
        sink.close()

    first, second, retried = recorder.requests
    for request in recorder.requests:
        assert (
            Webhook(SECRET).verify(request.body, request.headers)["type"]
            == "workflow.trigger.batch"
        )
    assert [item["delivery_id"] for item in first.json()["data"]] == ["dlv-1", "dlv-2"]
    assert [item["delivery_id"] for item in second.json()["data"]] == ["dlv-3"]
    assert first.json()["data"][0]["workflow_key"] == "welcome"
    assert (
        first.header("webhook-id")
        == retried.header("webhook-id")
        == batch_message_id(["dlv-1", "dlv-2"])
    )
    assert second.header("webhook-id") != first.header("webhook-id")


def test_webhook_sends_configured_extra_headers(recorder):
    sink = WebhookSink(
        "webhook", recorder.url, SECRET, timeout_seconds=0.5, headers={"X-Team": "growth"}
    )
    try:
        sink.send([delivery(1)])
    finally:
        sink.close()
    assert recorder.requests[0].header("x-team") == "growth"


@pytest.mark.parametrize(
    ("reply", "status", "retry_after"),
    [
        (Reply(200), "delivered", None),
        (Reply(204), "delivered", None),
        (Reply(500, body=b"boom"), "retry", None),
        (Reply(503, headers={"Retry-After": "7"}), "retry", 7.0),
        (Reply(429, headers={"Retry-After": "2"}), "retry", 2.0),
        (Reply(400, body=b"bad request"), "failed", None),
        (Reply(401), "failed", None),
        (Reply(404), "failed", None),
        (Reply(302, headers={"Location": "/elsewhere"}), "failed", None),
    ],
)
def test_webhook_maps_http_status_to_outcome(webhook, recorder, reply, status, retry_after):
    recorder.script(reply)
    (outcome,) = webhook.send([delivery(1)])
    assert (outcome.status, outcome.retry_after) == (status, retry_after)
    if status != "delivered":
        assert f"HTTP {reply.status}" in outcome.error


def test_webhook_hanging_past_the_timeout_answers_retry(webhook, recorder):
    recorder.script(Reply.hang(5))
    (outcome,) = webhook.send([delivery(1)])
    assert outcome.status == "retry"
    assert "timed out" in outcome.error


@pytest.mark.parametrize("headers", [False, True], ids=["body", "headers"])
@pytest.mark.parametrize("kind", ["webhook", "knock"])
def test_a_receiver_answering_a_byte_at_a_time_is_cut_off_at_the_timeout(
    request, recorder, kind, headers
):
    """A receiver that keeps each read within the timeout but never ends its answer (headers or
    body a byte at a time) is cut off when `timeout_seconds` are over in all: a send that never
    ends would hold its sink's thread, its claim's lease and a run's delivery step for good."""
    sink = request.getfixturevalue(kind)  # timeout_seconds=0.5
    recorder.script(Reply.trickle(8, headers=headers), Reply(200))
    started = time.monotonic()
    (outcome,) = sink.send([delivery(1)])
    assert time.monotonic() - started < 2.5
    assert outcome.status == "retry"
    assert "no whole answer within 0.5 s" in outcome.error
    # The sink's connection pool is still usable: the next send goes out and is answered.
    (outcome,) = sink.send([delivery(2)])
    assert outcome.status == "delivered"
    assert len(recorder.requests) == 2


def test_sends_on_a_pooled_connection_outlive_the_deadlines_of_earlier_ones(webhook, recorder):
    """The deadline cuts off only what is late: sends one after another on the same pooled
    connection are delivered, and so is one sent after their deadlines have passed."""
    for number in range(30):
        (outcome,) = webhook.send([delivery(number)])
        assert outcome.status == "delivered", outcome.error
    time.sleep(0.7)  # every deadline of those sends has passed: none cuts off the next send
    (outcome,) = webhook.send([delivery(99)])
    assert outcome.status == "delivered", outcome.error


def test_webhook_connection_reset_answers_retry(webhook, recorder):
    recorder.script(Reply.connection_reset())
    (outcome,) = webhook.send([delivery(1)])
    assert outcome.status == "retry"
    assert "connection" in outcome.error


def test_webhook_nothing_listening_answers_retry():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = WebhookSink("webhook", f"http://127.0.0.1:{port}/hooks", SECRET, timeout_seconds=0.5)
    try:
        (outcome,) = sink.send([delivery(1)])
    finally:
        sink.close()
    assert outcome.status == "retry"


def test_a_sink_reads_the_proxy_and_netrc_of_its_environment_once(tmp_path, monkeypatch):
    """What `requests` would read from the environment for every request (proxy variables,
    `~/.netrc`) is read when the sink is built and kept: honoured as before, but no longer looked
    up at each send (file look-ups on every webhook)."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login hook-user password hook-secret\n")
    netrc.chmod(0o600)
    with HttpRecorder() as target, HttpRecorder() as proxy:
        monkeypatch.setenv("NETRC", str(netrc))
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        webhook = WebhookSink("webhook", f"{target.url}/hooks", SECRET, timeout_seconds=2)
        knock = KnockSink("knock", target.url, "sk_test_123", timeout_seconds=2)
        # A sink that authorizes itself keeps its own header: requests would put netrc's in place.
        bearer = WebhookSink(
            "bearer",
            f"{target.url}/hooks",
            SECRET,
            timeout_seconds=2,
            headers={"Authorization": "Bearer hook-token"},
        )
        try:
            # Changed after the sinks were built: not read again.
            monkeypatch.delenv("HTTP_PROXY")
            monkeypatch.delenv("http_proxy")
            netrc.write_text("machine 127.0.0.1 login someone-else password other\n")
            for sink in (webhook, knock, bearer):
                assert [o.status for o in sink.send([delivery(1)])] == ["delivered"]
        finally:
            webhook.close()
            knock.close()
            bearer.close()
    assert target.requests == []
    hook, trigger, own = proxy.requests
    assert trigger.header("authorization") == "Bearer sk_test_123"
    assert own.header("authorization") == "Bearer hook-token"
    # Without a proxy, plain HTTP needs no CA bundle: none is looked up per request.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(netrc))
    direct = WebhookSink("webhook", "http://127.0.0.1:9/hooks", SECRET)
    direct.close()
    assert direct._session.verify is True
    # Through the proxy the request names the whole URL; the netrc's credentials as built.
    assert hook.path == f"{target.url}/hooks"
    assert trigger.path == f"{target.url}/v1/workflows/welcome/trigger"
    credentials = base64.b64encode(b"hook-user:hook-secret").decode()
    assert hook.header("authorization") == f"Basic {credentials}"


def test_retry_after_reads_seconds_and_http_dates():
    now = datetime(2015, 10, 21, 7, 27, 30, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_webhook_rejects_a_whsec_secret_that_is_not_base64():
    with pytest.raises(SinkConfigError, match="not base64"):
        WebhookSink("webhook", "http://127.0.0.1:1", "whsec_not*base64!")


# -- Knock sink -----------------------------------------------------------------------------------


def test_knock_sink_posts_the_trigger_with_bearer_and_idempotency_key(knock, recorder):
    assert knock.send([delivery(1, workflow_key="vip welcome")]) == [Outcome.delivered()]

    (request,) = recorder.requests
    assert (request.method, request.path) == ("POST", "/v1/workflows/vip%20welcome/trigger")
    assert request.header("authorization") == "Bearer sk_test_123"
    assert request.header("idempotency-key") == "dlv-1"
    assert request.header("content-type") == "application/json"
    assert request.json() == {
        "recipients": ["user-1"],
        "tenant": "acme",
        "data": {"event": "entered"},
    }


def test_knock_sink_sends_a_list_concurrently_and_answers_in_order(knock, recorder):
    recorder.respond_with(lambda request: 500 if "/broken/" in request.path else 200)
    batch = [delivery(1), delivery(2, "broken"), delivery(3), delivery(4, "broken"), delivery(5)]

    outcomes = knock.send(batch)

    assert [outcome.status for outcome in outcomes] == [
        "delivered",
        "retry",
        "delivered",
        "retry",
        "delivered",
    ]
    assert sorted(request.header("idempotency-key") for request in recorder.requests) == [
        f"dlv-{number}" for number in range(1, 6)
    ]


def test_knock_sink_maps_status_like_the_webhook(knock, recorder):
    recorder.script(
        Reply(429, headers={"Retry-After": "3"}), Reply(422, body=b'{"code":"invalid_params"}')
    )
    first, second = knock.send([delivery(1)]), knock.send([delivery(2)])
    assert (first[0].status, first[0].retry_after) == ("retry", 3.0)
    assert second[0].status == "failed" and "invalid_params" in second[0].error


def test_knock_sink_concurrency_is_bounded_by_its_rate_limit():
    slow = KnockSink("knock", "http://127.0.0.1:1", "sk", rate_limit_per_second=2)
    fast = KnockSink("knock", "http://127.0.0.1:1", "sk")
    try:
        assert (slow.batch_size, slow.concurrency) == (1, 2)
        assert (fast.rate_limit_per_second, fast.concurrency) == (60, 8)
    finally:
        close_sinks({"slow": slow, "fast": fast})


# -- the sinks file -------------------------------------------------------------------------------


SINKS_YAML = """
default: webhook
sinks:
  file: {type: file, path: out/workflow_triggers.jsonl}
  webhook: {type: webhook, url: "https://example.test/hooks", secret_env: WEBHOOK_SECRET,
            batch_size: 100, rate_limit_per_second: 50, timeout_seconds: 10}
  knock: {type: knock, base_url: "https://api.knock.app", secret_key_env: KNOCK_API_KEY,
          rate_limit_per_second: 60}
"""


def test_load_sinks_builds_every_kind_from_yaml(tmp_path):
    path = tmp_path / "config" / "sinks.yml"
    path.parent.mkdir()
    path.write_text(SINKS_YAML)

    sinks, default = load_sinks(
        path, environ={"WEBHOOK_SECRET": SECRET, "KNOCK_API_KEY": "sk_live"}
    )
    try:
        assert default == "webhook"
        assert isinstance(sinks["file"], FileSink)
        assert sinks["file"].path == tmp_path / "config" / "out" / "workflow_triggers.jsonl"
        webhook = sinks["webhook"]
        assert (webhook.url, webhook.batch_size, webhook.rate_limit_per_second) == (
            "https://example.test/hooks",
            100,
            50.0,
        )
        knock = sinks["knock"]
        assert (knock.trigger_url("welcome"), knock.rate_limit_per_second) == (
            "https://api.knock.app/v1/workflows/welcome/trigger",
            60.0,
        )
    finally:
        close_sinks(sinks)


def test_load_sinks_without_a_file_defaults_to_a_json_lines_file(tmp_path):
    sinks, default = load_sinks(tmp_path / "sinks.yml", environ={})
    assert default == "file"
    assert list(sinks) == ["file"]
    assert sinks["file"].path == tmp_path / "out" / "workflow_triggers.jsonl"


def test_a_missing_secret_variable_names_the_sink_and_the_variable(tmp_path):
    path = tmp_path / "sinks.yml"
    path.write_text(SINKS_YAML)
    with pytest.raises(SinkConfigError, match=r"sink 'webhook'.*WEBHOOK_SECRET"):
        load_sinks(path, environ={"KNOCK_API_KEY": "sk_live"})
    with pytest.raises(SinkConfigError, match=r"sink 'knock'.*KNOCK_API_KEY"):
        load_sinks(path, environ={"WEBHOOK_SECRET": SECRET})


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"sinks": {"x": {"type": "kafka"}}}, "unknown type 'kafka'"),
        ({"sinks": {"x": {"type": "file", "paht": "a.jsonl"}}}, "unknown settings paht"),
        ({"sinks": {"x": {"type": "webhook", "secret_env": "S"}}}, "`url` is required"),
        ({"sinks": {"x": {"type": "file", "batch_size": 0}}}, "batch_size"),
    ],
)
def test_sinks_config_errors_name_the_sink(document, message):
    with pytest.raises(SinkConfigError, match=message):
        sinks_from_config(document, Path("."), environ={"S": "secret"})


def test_several_sinks_need_a_declared_default(tmp_path):
    path = tmp_path / "sinks.yml"
    path.write_text("sinks:\n  a: {type: file, path: a.jsonl}\n  b: {type: file, path: b.jsonl}\n")
    with pytest.raises(SinkConfigError, match="`default` must name one"):
        load_sinks(path, environ={})
    path.write_text("sinks:\n  a: {type: file, path: a.jsonl}\n")
    sinks, default = load_sinks(path, environ={})
    assert default == "a" and sinks["a"].path == tmp_path / "a.jsonl"
