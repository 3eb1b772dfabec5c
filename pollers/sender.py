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
        self.key = api_key
        self.timeout = timeout
        self.conn = None

    def _post(self, body: bytes, idem_key: str):
        if self.conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self.conn = cls(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.request("POST", self.path, body=body, headers={
                "Content-Type": "application/json", "X-API-Key": self.key,
                "Idempotency-Key": idem_key, "User-Agent": "haltless-agent"})
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise
        return resp.status, resp.getheader("Retry-After"), data

    async def send(self, body: bytes, idem_key: str) -> dict:
        try:
            status, retry_after, data = await asyncio.to_thread(self._post, body, idem_key)
        except (OSError, http.client.HTTPException) as exc:
            raise RetryLater(f"cannot reach {self.host}:{self.port}: {exc}") from None
        if status == 207:
            return json.loads(data)
        detail = _detail(data)
        if status == 401:
            raise KeyRefused(f"the server refused the API key (401: {detail})")
        if status == 429 or status >= 500:
            raise RetryLater(f"server answered {status}: {detail}", _retry_after(retry_after))
        raise BatchRejected(f"server rejected the batch ({status}: {detail})")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _detail(data: bytes) -> str:
    try:
        return str(json.loads(data).get("detail"))[:500]
    except Exception:  # noqa: BLE001 - a proxy's HTML error page, say
        return data[:200].decode("utf-8", "replace")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, (when - _dt.datetime.now(_dt.timezone.utc)).total_seconds())
        except (TypeError, ValueError):
            return None
