"""Where workflow triggers go: a JSON-lines file, a signed webhook, or Knock's trigger API.

Every sink sends the same thing, the body of Knock's workflow trigger API, behind one small
interface (`Sink.send`), so the delivery loop neither knows nor cares which one it talks to. A sink
never raises for a network problem: it answers one `Outcome` per delivery, and the loop turns
"retry" outcomes into back-off and "failed" ones into dead letters. The file sink needs no setup and
is the default; the webhook sink signs its requests the Standard Webhooks way
(https://www.standardwebhooks.com) so any receiver can verify them with an off-the-shelf library;
the Knock sink calls `POST /v1/workflows/{key}/trigger` with the delivery id as `Idempotency-Key`,
so a retried trigger runs the workflow once.

Which sinks exist is declared in a small YAML file (see `load_sinks`); secrets come only from
environment variables named there.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import heapq
import hmac
import json
import math
import os
import socket
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import quote, urlsplit

import requests
import yaml
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from audiences.delivery import Delivery, Outcome
from audiences.store.database import now_text

USER_AGENT = "audiences-engine/0.1"
DEFAULT_FILE_SINK_PATH = Path("out") / "workflow_triggers.jsonl"
KNOCK_API_URL = "https://api.knock.app"

# Status codes worth trying again: throttling and server-side trouble. Everything else that is not
# 2xx is a refusal that the same request will meet again.
RETRYABLE_STATUS = {408, 429}
# How many requests an HTTP sink (webhook, Knock) has in flight at once, unless its settings say
# otherwise (a batching webhook: one), and the most they may say; never more than its rate limit
# per second.
DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 64


@runtime_checkable
class Sink(Protocol):
    """A destination for workflow triggers.

    `send` takes deliveries and answers one `Outcome` per delivery, in the same order; it never
    raises for a network problem (it answers retry outcomes instead). `batch_size` is how many
    deliveries one `send` call is built for and `rate_limit_per_second` (deliveries per second, or
    None for no limit) is honoured by the delivery loop. A sink may also offer `concurrency` (how
    many batches it sends at once in one `send` call; 1 when absent), `timeout_seconds` (how long
    one send may take; the loop's leases outlast it), `keeps_batches` (True when a batch is one
    message with an id of its own: the loop then forms each batch once, persists it with its id
    and retries it whole, see `Delivery.message_id`) and `close()` (release connections; see
    `close_sinks`).
    """

    name: str
    rate_limit_per_second: float | None
    batch_size: int

    def send(self, deliveries: list[Delivery]) -> list[Outcome]: ...


class SinkConfigError(ValueError):
    """The sinks file, or the environment it names, does not describe usable sinks."""


class FileSink:
    """Appends one JSON line per delivery to a file: the zero-setup default sink.

    Each line is `{"delivery_id", "workflow_key", "idempotency_key", **payload}`; a batch is flushed
    and fsynced before its outcomes say "delivered", so a crash can repeat lines (at least once)
    but never lose one that the store marked delivered.
    """

    def __init__(self, name: str, path: Path | str, batch_size: int = 500):
        self.name = name
        self.path = Path(path)
        self.batch_size = _positive_int(batch_size, "batch_size", name)
        self.rate_limit_per_second: float | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FileSink({self.name!r}, {str(self.path)!r}, batch_size={self.batch_size})"

    def send(self, deliveries: list[Delivery]) -> list[Outcome]:
        """Append the deliveries as JSON lines, flush and fsync, and answer their outcomes.

        A delivery whose payload cannot be written as JSON fails on its own; a file-system error
        (a full disk, a missing permission) answers retry for the whole batch, since the next
        attempt may well succeed.
        """
        outcomes: list[Outcome | None] = [None] * len(deliveries)
        lines: list[str] = []
        for index, delivery in enumerate(deliveries):
            record = {
                "delivery_id": delivery.delivery_id,
                "workflow_key": delivery.workflow_key,
                "idempotency_key": delivery.idempotency_key,
                **delivery.payload,
            }
            try:
                lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            except (TypeError, ValueError) as error:
                outcomes[index] = Outcome.failed(f"payload is not JSON: {error}")
        if lines:
            try:
                with self._lock:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with self.path.open("a", encoding="utf-8") as handle:
                        handle.write("".join(lines))
                        handle.flush()
                        os.fsync(handle.fileno())
            except OSError as error:
                failure = Outcome.retry(f"could not write {self.path}: {error}")
                return [outcome or failure for outcome in outcomes]
        return [outcome or Outcome.delivered() for outcome in outcomes]

    def close(self) -> None:
        """Nothing to release: the file is opened per batch."""


class WebhookSink:
    """POSTs triggers as JSON to a URL, signed the Standard Webhooks way.

    Headers `webhook-id`, `webhook-timestamp` (unix seconds) and `webhook-signature`
    (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`). With `batch_size` 1 each request is
    `{"type": "workflow.trigger", "timestamp", "data": {"workflow_key", "delivery_id", **payload}}`
    and its id is the delivery's idempotency key; with a larger `batch_size` each request is
    `{"type": "workflow.trigger.batch", "timestamp", "data": [...]}` and its id is the batch's
    `message_id`. The delivery loop forms each batch once and keeps it (`keeps_batches`), so a
    retried batch is the same deliveries under the same id and a receiver that deduplicates on
    `webhook-id` runs each delivery once. Deliveries given without a `message_id` are sliced by
    `batch_size`, each slice under a hash of its delivery ids.

    Up to `concurrency` requests are in flight at once (`DEFAULT_CONCURRENCY` unless set, or 1
    with `batch_size` above 1, where a request carries many; never more than the rate limit per
    second): the delivery loop's sends, and the requests of one `send` of several. The loop never
    has two deliveries of one recipient in flight, so one recipient's triggers keep their order.
    """

    def __init__(
        self,
        name: str,
        url: str,
        secret: str,
        timeout_seconds: float = 10,
        rate_limit_per_second: float | None = None,
        batch_size: int = 1,
        headers: Mapping[str, str] | None = None,
        concurrency: int | None = None,
    ):
        self.name = name
        self.url = url
        self.timeout_seconds = _positive_number(timeout_seconds, "timeout_seconds", name)
        self.rate_limit_per_second = _optional_rate(rate_limit_per_second, name)
        self.batch_size = _positive_int(batch_size, "batch_size", name)
        if concurrency is None:
            concurrency = DEFAULT_CONCURRENCY if self.batch_size == 1 else 1
        self.concurrency = _concurrency(concurrency, self.rate_limit_per_second, name)
        self.headers = dict(headers or {})
        self._secret = webhook_secret_bytes(secret, name)
        self._session = _session(
            self.concurrency, url, authorizes="authorization" in map(str.lower, self.headers)
        )

    def __repr__(self) -> str:
        return f"WebhookSink({self.name!r}, {self.url!r}, batch_size={self.batch_size})"

    @property
    def keeps_batches(self) -> bool:
        """Whether a batch is a message of its own (see the class docstring)."""
        return self.batch_size > 1

    def send(self, deliveries: list[Delivery]) -> list[Outcome]:
        """Send the deliveries: one request per batch (`message_id`), or per `batch_size` of them.

        Consecutive deliveries with the same `message_id` go in one request under that id, however
        many they are. Every delivery of one request shares that request's outcome: 2xx delivered;
        408, 429, 5xx, timeouts and connection errors retry (after `Retry-After` when the receiver
        gives one); any other status fails. Several requests go out concurrently (`concurrency`).
        """
        batches = self._requests(deliveries)
        outcomes: list[Outcome] = []
        for batch, outcome in zip(
            batches, _concurrently(self._post, batches, self.concurrency), strict=True
        ):
            outcomes.extend([outcome] * len(batch))
        return outcomes

    def _requests(self, deliveries: list[Delivery]) -> list[list[Delivery]]:
        requests: list[list[Delivery]] = []
        for delivery in deliveries:
            last = requests[-1] if requests else None
            if delivery.message_id is not None:
                joins = last is not None and last[0].message_id == delivery.message_id
            else:
                joins = (
                    last is not None and last[0].message_id is None and len(last) < self.batch_size
                )
            if joins:
                last.append(delivery)
            else:
                requests.append([delivery])
        return requests

    def _post(self, batch: list[Delivery]) -> Outcome:
        if batch[0].message_id is None and self.batch_size == 1:
            (delivery,) = batch
            message_id = delivery.idempotency_key
            document = {
                "type": "workflow.trigger",
                "timestamp": now_text(),
                "data": _webhook_item(delivery),
            }
        else:
            message_id = batch[0].message_id or batch_message_id(
                [delivery.delivery_id for delivery in batch]
            )
            document = {
                "type": "workflow.trigger.batch",
                "timestamp": now_text(),
                "data": [_webhook_item(delivery) for delivery in batch],
            }
        try:
            body = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as error:
            return Outcome.failed(f"payload is not JSON: {error}")
        timestamp = str(int(time.time()))
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": message_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": sign_webhook(self._secret, message_id, timestamp, body),
        }
        return _post_for_outcome(
            self._session, self.url, body.encode("utf-8"), headers, self.timeout_seconds
        )

    def close(self) -> None:
        """Close the pooled HTTP connections."""
        self._session.close()


class KnockSink:
    """Triggers workflows through Knock's API: one `POST /v1/workflows/{key}/trigger` per delivery.

    The payload is the request body, `Authorization: Bearer <secret key>` authenticates and the
    delivery id is the `Idempotency-Key` (Knock honours it for 24 hours), so a retried trigger
    runs the workflow once. A `send` with several deliveries makes its calls concurrently, on at
    most `concurrency` threads (`DEFAULT_CONCURRENCY`, no more than the rate limit per second);
    pacing the calls to the rate limit is the delivery loop's job.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        secret_key: str,
        timeout_seconds: float = 10,
        rate_limit_per_second: float | None = 60,
    ):
        if not secret_key:
            raise SinkConfigError(f"sink {name!r}: the Knock secret key is empty")
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.timeout_seconds = _positive_number(timeout_seconds, "timeout_seconds", name)
        self.rate_limit_per_second = _optional_rate(rate_limit_per_second, name)
        self.batch_size = 1
        self.concurrency = _concurrency(DEFAULT_CONCURRENCY, self.rate_limit_per_second, name)
        self._secret_key = secret_key
        self._session = _session(self.concurrency, self.base_url, authorizes=True)

    def __repr__(self) -> str:
        rate = self.rate_limit_per_second
        return f"KnockSink({self.name!r}, {self.base_url!r}, rate_limit_per_second={rate})"

    def trigger_url(self, workflow_key: str) -> str:
        """The trigger endpoint of one workflow, its key escaped as one path segment."""
        return f"{self.base_url}/v1/workflows/{quote(workflow_key, safe='')}/trigger"

    def send(self, deliveries: list[Delivery]) -> list[Outcome]:
        """Trigger each delivery's workflow, concurrently when there are several, in order.

        Outcomes follow the same mapping as the webhook sink: 2xx delivered; 408, 429, 5xx,
        timeouts and connection errors retry (after `Retry-After` when Knock gives one); other
        statuses (a bad key, an unknown workflow, an invalid body) fail.
        """
        return _concurrently(self._trigger, deliveries, self.concurrency)

    def _trigger(self, delivery: Delivery) -> Outcome:
        try:
            body = json.dumps(delivery.payload, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as error:
            return Outcome.failed(f"payload is not JSON: {error}")
        headers = {
            "Authorization": f"Bearer {self._secret_key}",
            "Idempotency-Key": delivery.idempotency_key,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        url = self.trigger_url(delivery.workflow_key)
        return _post_for_outcome(
            self._session, url, body.encode("utf-8"), headers, self.timeout_seconds
        )

    def close(self) -> None:
        """Close the pooled HTTP connections."""
        self._session.close()


def sign_webhook(secret: bytes, message_id: str, timestamp: str, body: str) -> str:
    """The Standard Webhooks signature header value for one message: `v1,<base64 HMAC-SHA256>`.

    The signed content is `"{message_id}.{timestamp}.{body}"` in UTF-8, keyed with the secret's
    bytes (see `webhook_secret_bytes`), exactly what receivers' verification libraries recompute.
    """
    content = f"{message_id}.{timestamp}.{body}".encode()
    digest = hmac.new(secret, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def webhook_secret_bytes(secret: str, sink_name: str = "webhook") -> bytes:
    """The HMAC key of a webhook secret: base64-decoded after `whsec_`, or a raw string's UTF-8.

    Standard Webhooks secrets look like `whsec_<base64>`; any other non-empty string is taken as
    the key itself, for receivers that configure a plain shared secret.
    """
    if not secret:
        raise SinkConfigError(f"sink {sink_name!r}: the webhook secret is empty")
    if secret.startswith("whsec_"):
        encoded = secret[len("whsec_") :]
        try:
            # Accept secrets whose base64 padding was dropped, as the reference libraries do.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError) as error:
            raise SinkConfigError(
                f"sink {sink_name!r}: the whsec_ secret is not base64 ({error})"
            ) from None
        if not key:
            raise SinkConfigError(f"sink {sink_name!r}: the webhook secret is empty")
        return key
    return secret.encode("utf-8")


def batch_message_id(delivery_ids: list[str]) -> str:
    """A deterministic webhook id for a batch: the same delivery ids, in any order, give one id.

    Order does not count because a retried batch may come back from the store in another order.
    """
    digest = hashlib.sha256("\n".join(sorted(delivery_ids)).encode("utf-8")).hexdigest()
    return f"batch_{digest[:40]}"


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP-date); None if unreadable.

    A date in the past means "now" (0 seconds); `now` defaults to the current UTC time.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def outcome_for_response(status_code: int, headers: Mapping[str, str], text: str) -> Outcome:
    """Map one HTTP response to an outcome: 2xx delivered, 429/408/5xx retry, others failed."""
    if 200 <= status_code < 300:
        return Outcome.delivered()
    error = f"HTTP {status_code}"
    snippet = " ".join(text.split())[:300]
    if snippet:
        error = f"{error}: {snippet}"
    if status_code in RETRYABLE_STATUS or status_code >= 500:
        return Outcome.retry(error, parse_retry_after(headers.get("Retry-After")))
    if 300 <= status_code < 400:
        return Outcome.failed(f"{error} (redirects are not followed; fix the sink URL)")
    return Outcome.failed(error)


def close_sinks(sinks: Mapping[str, object]) -> None:
    """Close every sink that holds resources (HTTP sessions); safe to call more than once."""
    for sink in sinks.values():
        close = getattr(sink, "close", None)
        if callable(close):
            close()


def sinks_from_config(
    document: Mapping | None,
    base_dir: Path,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Sink]:
    """Build the sinks a parsed sinks document declares, reading secrets from `environ`.

    The document is the YAML of `load_sinks`; relative file paths are resolved against `base_dir`
    (the YAML file's folder). Unknown sink types or keys, and a secret variable that is not set,
    raise `SinkConfigError` naming the sink, so a typo fails at start-up rather than at delivery.
    """
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise SinkConfigError("the sinks file must be a mapping with a `sinks` key")
    unknown = set(document) - {"default", "sinks"}
    if unknown:
        raise SinkConfigError(
            f"the sinks file has unknown keys: {', '.join(sorted(map(str, unknown)))}"
        )
    declared = document.get("sinks") or {}
    if not isinstance(declared, Mapping):
        raise SinkConfigError("`sinks` must map sink names to their settings")
    sinks: dict[str, Sink] = {}
    for name, settings in declared.items():
        name = str(name)
        if not isinstance(settings, Mapping):
            raise SinkConfigError(f"sink {name!r}: settings must be a mapping")
        kind = settings.get("type")
        builder = _BUILDERS.get(kind)
        if builder is None:
            raise SinkConfigError(
                f"sink {name!r}: unknown type {kind!r} "
                f"(expected one of: {', '.join(sorted(_BUILDERS))})"
            )
        allowed = _ALLOWED_KEYS[kind]
        extra = set(settings) - allowed - {"type"}
        if extra:
            raise SinkConfigError(
                f"sink {name!r}: unknown settings {', '.join(sorted(map(str, extra)))} "
                f"(a {kind} sink takes: {', '.join(sorted(allowed))})"
            )
        try:
            sinks[name] = builder(name, settings, Path(base_dir), environ)
        except SinkConfigError:
            raise
        except (TypeError, ValueError) as error:
            raise SinkConfigError(f"sink {name!r}: {error}") from None
    return sinks


def load_sinks(path: Path, environ: Mapping[str, str] = os.environ) -> tuple[dict[str, Sink], str]:
    """Read a sinks YAML file; return the sinks and the name of the default one.

    The format (file paths are relative to the YAML file; secrets only through the environment
    variables named by `secret_env` / `secret_key_env`)::

        default: file
        sinks:
          file: {type: file, path: out/workflow_triggers.jsonl, batch_size: 500}
          webhook: {type: webhook, url: "https://example.test/hooks", secret_env: WEBHOOK_SECRET,
                    batch_size: 100, rate_limit_per_second: 50, timeout_seconds: 10,
                    headers: {X-Team: growth}, concurrency: 8}
          knock: {type: knock, base_url: "https://api.knock.app", secret_key_env: KNOCK_API_KEY,
                  rate_limit_per_second: 60, timeout_seconds: 10}

    `default` may be left out when only one sink is declared. When the file does not exist (or is
    empty), the result is a single default sink,
    `FileSink("file", <folder of the YAML>/out/workflow_triggers.jsonl)`, so a first run needs no
    setup.
    """
    path = Path(path)
    fallback = {"file": FileSink("file", path.parent / DEFAULT_FILE_SINK_PATH)}
    if not path.exists():
        return fallback, "file"
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise SinkConfigError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if document is None:
        return fallback, "file"
    try:
        sinks = sinks_from_config(document, path.parent, environ)
    except SinkConfigError as error:
        raise SinkConfigError(f"{path}: {error}") from None
    if not sinks:
        raise SinkConfigError(f"{path}: no sinks declared under `sinks`")
    default = document.get("default")
    if default is None:
        if len(sinks) != 1:
            close_sinks(sinks)
            raise SinkConfigError(f"{path}: several sinks are declared, so `default` must name one")
        default = next(iter(sinks))
    default = str(default)
    if default not in sinks:
        close_sinks(sinks)
        raise SinkConfigError(f"{path}: the default sink {default!r} is not declared under `sinks`")
    return sinks, default


# -- building sinks from settings ---------------------------------------------------------------


def _file_sink(
    name: str, settings: Mapping, base_dir: Path, environ: Mapping[str, str]
) -> FileSink:
    path = Path(str(settings.get("path", DEFAULT_FILE_SINK_PATH))).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return FileSink(name, path, batch_size=settings.get("batch_size", 500))


def _webhook_sink(
    name: str, settings: Mapping, base_dir: Path, environ: Mapping[str, str]
) -> WebhookSink:
    url = _required_text(settings, "url", name)
    secret = _secret(settings, "secret_env", name, environ)
    headers = settings.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise SinkConfigError(f"sink {name!r}: `headers` must map header names to values")
    return WebhookSink(
        name,
        url,
        secret,
        timeout_seconds=settings.get("timeout_seconds", 10),
        rate_limit_per_second=settings.get("rate_limit_per_second"),
        batch_size=settings.get("batch_size", 1),
        headers={str(key): str(value) for key, value in headers.items()},
        concurrency=settings.get("concurrency"),
    )


def _knock_sink(
    name: str, settings: Mapping, base_dir: Path, environ: Mapping[str, str]
) -> KnockSink:
    return KnockSink(
        name,
        base_url=str(settings.get("base_url") or KNOCK_API_URL),
        secret_key=_secret(settings, "secret_key_env", name, environ),
        timeout_seconds=settings.get("timeout_seconds", 10),
        rate_limit_per_second=settings.get("rate_limit_per_second", 60),
    )


_BUILDERS = {"file": _file_sink, "webhook": _webhook_sink, "knock": _knock_sink}
_ALLOWED_KEYS = {
    "file": {"path", "batch_size"},
    "webhook": {
        "url",
        "secret_env",
        "timeout_seconds",
        "rate_limit_per_second",
        "batch_size",
        "headers",
        "concurrency",
    },
    "knock": {"base_url", "secret_key_env", "timeout_seconds", "rate_limit_per_second"},
}


def _required_text(settings: Mapping, key: str, sink_name: str) -> str:
    value = settings.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SinkConfigError(f"sink {sink_name!r}: `{key}` is required")
    return value.strip()


def _secret(settings: Mapping, key: str, sink_name: str, environ: Mapping[str, str]) -> str:
    variable = _required_text(settings, key, sink_name)
    value = environ.get(variable)
    if not value:
        raise SinkConfigError(
            f"sink {sink_name!r}: environment variable {variable} (named by `{key}`) is not set"
        )
    return value


def _positive_int(value, setting: str, sink_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SinkConfigError(
            f"sink {sink_name!r}: `{setting}` must be a positive whole number, not {value!r}"
        )
    return value


def _positive_number(value, setting: str, sink_name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or math.isinf(value)
    ):
        raise SinkConfigError(
            f"sink {sink_name!r}: `{setting}` must be a positive number, not {value!r}"
        )
    return float(value)


def _concurrency(value, rate_limit: float | None, sink_name: str) -> int:
    """How many requests a sink makes at once: `value` (1 to `MAX_CONCURRENCY`), and no more than
    its rate limit per second (a request in flight per token a second)."""
    concurrency = _positive_int(value, "concurrency", sink_name)
    if concurrency > MAX_CONCURRENCY:
        raise SinkConfigError(
            f"sink {sink_name!r}: `concurrency` must be at most {MAX_CONCURRENCY}, not {value!r}"
        )
    if rate_limit is not None:
        concurrency = min(concurrency, max(1, math.floor(rate_limit)))
    return concurrency


def _optional_rate(value, sink_name: str) -> float | None:
    if value is None:
        return None
    return _positive_number(value, "rate_limit_per_second", sink_name)


# -- HTTP -----------------------------------------------------------------------------------------


def _session(pool_size: int, url: str, *, authorizes: bool) -> requests.Session:
    """A sink's HTTP session for requests to `url`'s host. What `requests` reads from the
    environment for a request (the proxy variables and `no_proxy`, the CA bundle variables,
    `~/.netrc`) is read here, once, for the sink's life: `requests` reads them again for every
    request (file look-ups on each send). A sink is built again when the sinks file changes and
    at each worker's start. A sink that `authorizes` its requests itself (Knock's Bearer key, a
    webhook's own `Authorization` header) takes no `~/.netrc` credentials: `requests` would put
    them in place of its header."""
    session = requests.Session()
    # No automatic retries or redirects: the delivery loop owns retries, with back-off and a record.
    adapter = _DeadlineAdapter(pool_connections=1, pool_maxsize=max(1, pool_size), max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    environment = session.merge_environment_settings(url, {}, None, None, None)
    session.proxies = environment["proxies"]
    session.verify = environment["verify"]
    if urlsplit(url).scheme == "http" and not session.proxies:
        # No TLS on the way: a CA bundle's path would only cost a directory check per request.
        session.verify = True
    session.auth = None if authorizes else requests.utils.get_netrc_auth(url)
    session.trust_env = False
    return session


def _concurrently(send, items: list, concurrency: int) -> list[Outcome]:
    """`send(item)` for each item, on at most `concurrency` threads; the outcomes in item order."""
    if len(items) <= 1 or concurrency <= 1:
        return [send(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(concurrency, len(items))) as pool:
        return list(pool.map(send, items))


def _post_for_outcome(
    session: requests.Session,
    url: str,
    body: bytes,
    headers: dict[str, str],
    timeout: float,
) -> Outcome:
    """One POST, answered within `timeout` seconds in all: `requests`' own timeout bounds the
    connection and each read, and the request's `_Deadline` ends one whose receiver keeps sending
    its headers or body a little at a time (every read within the timeout, the whole never done)."""
    deadline = _Deadline(time.monotonic() + timeout)
    _DEADLINES.current = deadline
    _WATCHDOG.watch(deadline)
    try:
        # `stream`: the body is read below, inside the deadline, rather than in `post`.
        with session.post(
            url, data=body, headers=headers, timeout=timeout, allow_redirects=False, stream=True
        ) as response:
            text = response.text
        if deadline.expired:
            # Cut off mid-answer: what was read (headers ended early by the shutdown) is no answer.
            return Outcome.retry(f"timed out: no whole answer within {timeout:g} s")
        return outcome_for_response(response.status_code, response.headers, text)
    except requests.RequestException as error:
        if deadline.expired:
            return Outcome.retry(f"timed out: no whole answer within {timeout:g} s")
        if isinstance(error, requests.Timeout):
            return Outcome.retry(f"timed out after {timeout:g} s: {error}")
        if isinstance(error, requests.ConnectionError):
            return Outcome.retry(f"connection error: {error}")
        # Anything else requests can raise (an invalid URL, a broken response) may be fixed by an
        # operator before the attempts run out, so it retries rather than failing at once.
        return Outcome.retry(f"request error: {type(error).__name__}: {error}")
    finally:
        _DEADLINES.current = None
        deadline.cancel()


class _Deadline:
    """When one request must be over. Its connection is attached (`attach`) as the request goes
    out; at `at` (monotonic seconds) the watchdog shuts that connection's socket down, which ends
    any read blocked on it, unless the request was over and `cancel`led first, or its connection
    has gone on to another request."""

    def __init__(self, at: float):
        self.at = at
        self.expired = False
        self.cancelled = False
        self._connection = None
        self._lock = threading.Lock()

    def attach(self, connection) -> None:
        with self._lock:
            self._connection = connection
            late = self.expired
        if late:
            _shut_down(connection, self)

    def expire(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.expired = True
            connection = self._connection
        if connection is not None:
            _shut_down(connection, self)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            self._connection = None


def _shut_down(connection, deadline: _Deadline) -> None:
    """Shut down `connection`'s socket if it still serves `deadline`'s request."""
    with connection._deadline_lock:
        if connection._deadline is not deadline or connection.sock is None:
            return
        with contextlib.suppress(OSError):  # already closed
            socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)


class _Watchdog:
    """One daemon thread that expires the requests' deadlines as they come due."""

    def __init__(self):
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._count = 0
        self._thread: threading.Thread | None = None

    def watch(self, deadline: _Deadline) -> None:
        with self._condition:
            self._count += 1
            heapq.heappush(self._heap, (deadline.at, self._count, deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="sink-deadlines", daemon=True
                )
                self._thread.start()
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._condition.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._condition.wait(wait)
                    continue
                deadline = heapq.heappop(self._heap)[2]
            deadline.expire()


_WATCHDOG = _Watchdog()
_DEADLINES = threading.local()  # `current`: the deadline of the request this thread is making


class _DeadlineConnectionMixin:
    """A connection that attaches itself to the deadline of the request its thread is making."""

    def request(self, *args, **kwargs):
        deadline = getattr(_DEADLINES, "current", None)
        if not hasattr(self, "_deadline_lock"):
            self._deadline_lock = threading.Lock()
        with self._deadline_lock:
            self._deadline = deadline
        if deadline is not None:
            deadline.attach(self)
        return super().request(*args, **kwargs)

    def getresponse(self, *args, **kwargs):
        deadline = getattr(self, "_deadline", None)
        if deadline is not None and deadline.expired:
            _shut_down(self, deadline)  # it expired while this connection was being made
        return super().getresponse(*args, **kwargs)


class _DeadlineHTTPConnection(_DeadlineConnectionMixin, HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnectionMixin, HTTPSConnection):
    pass


class _DeadlineHTTPPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


_DEADLINE_POOLS = {"http": _DeadlineHTTPPool, "https": _DeadlineHTTPSPool}


class _DeadlineAdapter(HTTPAdapter):
    """`requests`' adapter whose connections obey `_post_for_outcome`'s deadlines (through an
    HTTP proxy too; a SOCKS proxy's connections keep `requests`' per-read timeout alone)."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_DEADLINE_POOLS)

    def proxy_manager_for(self, proxy, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = dict(_DEADLINE_POOLS)
        return manager


def _webhook_item(delivery: Delivery) -> dict:
    return {
        "workflow_key": delivery.workflow_key,
        "delivery_id": delivery.delivery_id,
        **delivery.payload,
    }
