"""How the edge agent pushes: one batch at a time to ``POST /api/v1/ingest``
over one keep-alive connection (http.client in a thread), with its
Idempotency-Key. The server's answer becomes the agent's next step: 207
done, 401 stop sending (``KeyRefused``), 429/5xx/unreachable retry
(``RetryLater``, with the server's Retry-After), any other 4xx drop the
batch (``BatchRejected``)."""
from __future__ import annotations

import asyncio
import datetime as _dt
import email.utils
import http.client
import json
from urllib.parse import urlsplit

from ..core.errors import BatchRejected, KeyRefused, RetryLater


class Sender:
    """POSTs batches over one keep-alive connection (http.client in a thread)."""

    def __init__(self, api_url: str, api_key: str, timeout: float = 30.0) -> None:
        parts = urlsplit(api_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        path = parts.path.rstrip("/")
        self.path = path if path.endswith("/api/v1/ingest") else path + "/api/v1/ingest"
        self.base = self.path.removesuffix("/api/v1/ingest")  # where the server's API starts
        self.key = api_key
        self.timeout = timeout
        self.conn = None

    def url(self, path: str | None = None) -> str:
        """``path`` (default the ingest path) on this server, for messages:
        scheme, host and port only, so no credentials in the URL are repeated."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.https else 'http'}://{host}:{self.port}{path or self.path}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None):
        """(status, response headers, body) of one request with the key, on the
        kept connection; OSError or HTTPException when the server cannot be reached."""
        if self.conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self.conn = cls(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, body=body, headers={
                "X-API-Key": self.key, "User-Agent": "haltless-agent", **(headers or {})})
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise
        return resp.status, resp, data

    def _post(self, body: bytes, idem_key: str):
        status, resp, data = self.request("POST", self.path, body, {
            "Content-Type": "application/json", "Idempotency-Key": idem_key})
        return status, resp.getheader("Retry-After"), data

    async def send(self, body: bytes, idem_key: str) -> dict:
        try:
            status, retry_after, data = await asyncio.to_thread(self._post, body, idem_key)
        except (OSError, http.client.HTTPException) as exc:
            raise RetryLater(f"cannot reach {self.host}:{self.port}: {exc}") from None
        if status == 207:
            return json.loads(data)
        detail = answer_detail(data)
        if status == 401:
            raise KeyRefused(f"the server refused the API key (401: {detail})")
        if status == 429 or status >= 500:
            raise RetryLater(f"server answered {status}: {detail}", _retry_after(retry_after))
        raise BatchRejected(f"server rejected the batch ({status}: {detail})")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def answer_detail(data: bytes) -> str:
    """The ``detail`` of an error answer, or the start of whatever else came
    (a proxy's HTML error page, say), on one line."""
    try:
        text = str(json.loads(data).get("detail"))[:500]
    except Exception:  # noqa: BLE001 - not our JSON
        text = data[:200].decode("utf-8", "replace")
    return " ".join(text.split())


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, (when - _dt.datetime.now(_dt.UTC)).total_seconds())
        except (TypeError, ValueError):
            return None
