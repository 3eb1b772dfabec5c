"""``haltless agent --check``: would this agent deliver? Like Telegraf's
``--test``, it tries what the agent would do, once, and says what is wrong
and where in one line per problem:

1. the file (``load_config``: a mistake is one line on stderr and exit 2,
   as when the agent starts);
2. the server and the key: ``POST /api/v1/ingest`` with an empty batch, which
   stores nothing and which an ingest API answers 207 for a valid key and 401
   for any other; so a wrong host, port or path, something that is not an
   ingest API, and a refused key are each told apart;
3. each source's machine: ``GET /api/v1/ingest/machines`` (haltless's, not the
   public contract's: a compatible server without it is said and skipped),
   since readings for a machine the key's organization lacks are rejected;
4. each source's device, once (a table).

``--offline`` stops after 1, for a deployment step that validates the file
where neither the server nor the devices can be reached. Exit code 0 when
everything passed, 1 when anything failed.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

from ..core.config import Settings
from ..core.console import print_table
from ..core.logs import run_until_signal
from .agent import is_subscribed, reader_for, subscriber_for
from .agent_config import AgentConfig, load_config
from .readers import outer_timeout, probe_reader, probe_subscriber
from .sender import Sender, answer_detail

EMPTY_BATCH = b'{"readings": []}'
MACHINES_PATH = "/api/v1/ingest/machines"
MACHINES_PER_REQUEST = 100  # the server's MAX_MACHINE_CHECK
QUERY_BUDGET = 4000  # bytes of query string per request: well under the 8 kB many proxies allow
SERVER_TIMEOUT = 10.0


class Report:
    """The check's lines: ``ok``, ``FAIL`` or ``skip`` and one line of text each."""

    def __init__(self) -> None:
        self.failed = 0

    def ok(self, text: str) -> None:
        self._line("ok", text)

    def fail(self, text: str) -> None:
        self.failed += 1
        self._line("FAIL", text)

    def skip(self, text: str) -> None:
        self._line("skip", text)

    @staticmethod
    def _line(kind: str, text: str) -> None:
        print(f"{kind:<5} {text}", flush=True)


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


async def check_server(sender: Sender, report: Report) -> bool:
    """True when api_url is an ingest API that accepted the key."""
    where = sender.url()
    try:
        status, resp, data = await asyncio.to_thread(
            sender.request, "POST", sender.path, EMPTY_BATCH, {"Content-Type": "application/json"})
    except (OSError, http.client.HTTPException) as exc:
        report.fail(f"server {where}: cannot connect ({_why(exc)}); is the server running "
                    "there, and are api_url's host and port right?")
        return False
    if status == 401:
        report.fail(f"api_key: refused by {where} (401: {answer_detail(data)}); use a key "
                    "this server issued (`haltless keys create` on it)")
        return False
    if status == 207 and _is_ingest_answer(data):
        report.ok(f"server {where}: an ingest API; api_key accepted")
        return True
    what = f"answered {status} ({resp.getheader('Content-Type') or 'no content type'})"
    if status == 404:
        hint = ("nothing takes readings at that path; api_url is the server's base URL "
                "(http://host:8000) or its full .../api/v1/ingest")
    elif (status == 429 or status >= 500) and _is_error_answer(data):
        hint = (f"the server cannot take readings now ({answer_detail(data)}); the agent "
                "would queue them and retry")
    else:
        hint = "not the 207 of an ingest API; is api_url the haltless server?"
    report.fail(f"server {where}: {what} to an empty batch: {hint}")
    return False


def _is_ingest_answer(data: bytes) -> bool:
    try:
        answer = json.loads(data)
    except ValueError:
        return False
    return isinstance(answer, dict) and "accepted_count" in answer


def _is_error_answer(data: bytes) -> bool:
    """An API's JSON refusal ({"detail": ...}), not some web server's page."""
    try:
        return "detail" in json.loads(data)
    except (ValueError, TypeError):
        return False


def _batches(identifiers: list[str]):
    """The identifiers in groups a request's query string can carry."""
    batch: list[str] = []
    size = 0
    for ident in identifiers:
        cost = len(urlencode([("machine_identifier", ident)])) + 1
        if batch and (len(batch) == MACHINES_PER_REQUEST or size + cost > QUERY_BUDGET):
            yield batch
            batch, size = [], 0
        batch.append(ident)
        size += cost
    if batch:
        yield batch


async def check_machines(sender: Sender, cfg: AgentConfig, report: Report) -> None:
    """A FAIL line for each source whose machine the key's organization lacks."""
    where = sender.url(sender.base + MACHINES_PATH)
    wanted = list(dict.fromkeys(src.machine_identifier for src in cfg.source))
    found: set[str] = set()
    for batch in _batches(wanted):
        path = sender.base + MACHINES_PATH + "?" + urlencode(
            [("machine_identifier", m) for m in batch])
        try:
            status, _, data = await asyncio.to_thread(sender.request, "GET", path)
        except (OSError, http.client.HTTPException) as exc:
            report.fail(f"machines: {where}: cannot connect ({_why(exc)})")
            return
        if status in (404, 405):
            report.skip(f"machines: not checked: {where} answered {status} (a compatible "
                        "server or an older haltless); readings for a machine it does not "
                        "know come back rejected (\"Machine not found\")")
            return
        try:
            answer = json.loads(data) if status == 200 else None
            found.update(m for m in answer["found"] if isinstance(m, str))
        except (ValueError, TypeError, KeyError):
            report.fail(f"machines: {where}: answered {status}: {answer_detail(data)}")
            return
    missing = 0
    for src in cfg.source:
        m = src.machine_identifier
        if m not in found:
            missing += 1
            report.fail(f"source {src.name!r}: machine {m!r} is not registered in api_key's "
                        f"organization on {sender.url(sender.base or '/')}: its readings would "
                        f"be rejected; register it there (`haltless machines add {shlex.quote(m)}`)"
                        " or correct machine_identifier")
    if not missing:
        report.ok(f"machines: all {len(wanted)} registered ({_some(wanted)})")


def _some(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown if len(names) <= n else f"{shown}, ... ({len(names) - n} more)"


async def check_devices(cfg: AgentConfig, config_path: Path, report: Report) -> None:
    """Each source's device once, as a table; a failed one counts as a problem."""
    state_dir = (Path(config_path).parent / cfg.state_dir).resolve()
    rows = []
    for src in cfg.source:
        section = getattr(src, src.protocol)
        start = time.monotonic()
        if is_subscribed(src):
            sub = subscriber_for(src, state_dir)
            ok, message = await probe_subscriber(sub, len(section.nodes),
                                                 outer_timeout(section.timeout_seconds)
                                                 + sub.publishing_interval)
        else:
            ok, message = await probe_reader(reader_for(src, state_dir),
                                             outer_timeout(section.timeout_seconds))
        if not ok:
            report.failed += 1
        rows.append((src.name, src.machine_identifier, "ok" if ok else "failed",
                     f"{(time.monotonic() - start) * 1000:.0f} ms", message))
    print_table(rows, ["SOURCE", "MACHINE", "DEVICE", "LATENCY", "MESSAGE"], ragged_last=True)


async def check(cfg: AgentConfig, config_path: Path) -> bool:
    """Server and key, machines, devices; True when nothing failed."""
    report = Report()
    sender = Sender(cfg.api_url, cfg.api_key, timeout=SERVER_TIMEOUT)
    try:
        if await check_server(sender, report):
            await check_machines(sender, cfg, report)
        else:
            report.skip("machines: not checked (the server or the key failed above)")
    finally:
        sender.close()
    await check_devices(cfg, config_path, report)
    print("check passed" if not report.failed else
          f"check failed: {report.failed} problem{'s' if report.failed > 1 else ''}", flush=True)
    return not report.failed


def main(config_path: str, offline: bool, settings: Settings) -> int:
    cfg = load_config(Path(config_path))
    print(f"{config_path}: configuration OK ({len(cfg.source)} sources)", flush=True)
    if offline:
        print("offline: the server, the machines and the devices were not checked")
        return 0
    passed = run_until_signal(lambda stop: check(cfg, Path(config_path)), settings.log_level)
    sys.stdout.flush()
    return 0 if passed else 1
