"""Push notifications for offline devices, through HTTP webhooks.

After each commit the committer calls :meth:`Pusher.offer` (synchronous, a
deque append), so live delivery never waits for push.  One intake task turns
offers into per-device pending entries: it resolves the conversations'
push-registered devices in one storage query per batch and coalesces a burst
into one entry per device (latest position plus a message count).  A
scheduler takes the entries that are due, drops those whose device is
connected (it gets the message live), and hands the rest to ``concurrency``
sender tasks; each device has at most one request in flight.

The webhook body is the minimum a push needs: provider, zone, token, device,
conversation id (hex), latest seq and count.  No ciphertext, no sender, no
DID ever leaves the relay through this path.

Every queue is bounded (intake, pending devices, hand-off channel); beyond a
bound pushes are dropped and counted, because push is best effort and the
device catches up from its cursor when it reconnects anyway.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from relay.base.incidents import Incidents
from relay.base.logs import short_did
from relay.base.parsing import parse_providers as parse_providers  # moved; re-exported
from storage.records import PushRegistration

log = logging.getLogger("relay.push")

Key = tuple[str, str]  # (user, device)

#: Offers taken from the intake per resolve() call.
_BATCH = 512
#: resolve()/online() are retried this often (a short outage) before the batch is dropped.
_CALLBACK_ATTEMPTS = 3
_CALLBACK_BACKOFF_S = 0.2
#: A Retry-After longer than this is not waited for in full.
_RETRY_AFTER_CAP_S = 300.0
#: A member's push-registered device, exactly as storage returns it: user (a
#: DID, never sent to the provider), device, provider (a configured name),
#: zone and token (forwarded), joined_seq (the member sees only seq > it).
PushTarget = PushRegistration


@dataclass(frozen=True, slots=True)
class PushConfig:
    providers: dict[str, str]  # provider name -> webhook URL
    secret: str = ""  # if set: X-Relay-Signature: sha256=<hex HMAC-SHA256(secret, body)>
    queue_limit: int = 10000  # most devices waiting (coalesced per device)
    coalesce_s: float = 0.25
    max_attempts: int = 6
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    attempt_timeout_s: float = 5.0
    concurrency: int = 8
    intake_limit: int = 10000  # most offers (committed messages) waiting for the intake
    callback_timeout_s: float = 10.0  # bound on one resolve() / online() / on_gone() call


@dataclass(slots=True)
class PushStats:
    offered: int = 0
    sent: int = 0
    failed: int = 0  # gave up (permanent error, attempts exhausted, lookups failing)
    dropped: int = 0  # a bound was full
    retried: int = 0
    coalesced: int = 0  # messages merged into a device's waiting entry
    gone: int = 0  # 410: the token is dead
    online: int = 0  # skipped: the device was connected at send time
    poisoned: int = 0  # dropped: handling the entry raised (relay/base/incidents.py)


Resolve = Callable[[list[bytes]], Awaitable[dict[bytes, list[PushTarget]]]]
Online = Callable[[list[tuple[str, str]]], Awaitable[set[tuple[str, str]]]]
OnGone = Callable[[PushTarget], Awaitable[None]]


def _tag(target: PushTarget) -> str:
    """Who a log line is about, without the DID or the token."""
    return f"{short_did(target.user)}/{target.device} token={target.token[:4]}…"


@dataclass(slots=True, eq=False)
class _Entry:
    """One device waiting for a push: the latest position and how many since the last one."""

    target: PushTarget
    conversation: bytes
    seq: int
    count: int
    attempts: int = 0


class Pusher:
    def __init__(
        self,
        config: PushConfig,
        resolve: Resolve,
        online: Online,
        on_gone: OnGone | None = None,
        incidents: Incidents | None = None,
    ) -> None:
        self.config = config
        self.stats = PushStats()
        self._resolve = resolve
        self._online = online
        self._on_gone = on_gone
        self._intake: deque[tuple[bytes, int, str, str]] = deque()
        self._arrived = trio.Event()
        self._pending: dict[Key, _Entry] = {}
        # (due, tie-break, entry): one item per waiting entry; none while it is in flight,
        # which is what keeps each device to one request at a time.
        self._heap: list[tuple[float, int, _Entry]] = []
        self._order = 0
        self._busy = 0  # entries handed to senders (or being checked online) right now
        self._wake = trio.Event()
        self._client: httpx.AsyncClient | None = None
        self._unknown: set[str] = set()  # unconfigured providers already logged
        #: Where a dropped entry is logged and counted (the node's, in a relay).
        self.incidents = Incidents() if incidents is None else incidents

    # --- intake --------------------------------------------------------------

    def offer(self, conversation: bytes, seq: int, sender: str, sender_device: str) -> None:
        """A message committed: queue it for push (synchronous, never blocks)."""
        self.stats.offered += 1
        if len(self._intake) >= self.config.intake_limit:
            self.stats.dropped += 1
            return
        self._intake.append((conversation, seq, sender, sender_device))
        self._arrived.set()

    def pending(self) -> int:
        """Offers not yet resolved plus devices waiting for (or in) a push."""
        return len(self._intake) + len(self._pending)

    async def _intake_loop(self) -> None:
        while True:
            if not self._intake:
                self._arrived = trio.Event()
                await self._arrived.wait()
                continue
            n = min(len(self._intake), _BATCH)
            await self._absorb([self._intake.popleft() for _ in range(n)])

    async def _absorb(self, batch: list[tuple[bytes, int, str, str]]) -> None:
        conversations = list(dict.fromkeys(m[0] for m in batch))
        targets = await self._call("resolve", self._resolve, conversations)
        if targets is None:
            self.stats.failed += len(batch)
            return
        for conversation, seq, sender, sender_device in batch:  # commit order: latest wins
            for target in targets.get(conversation, ()):
                if target.user == sender and target.device == sender_device:
                    continue  # the sender's own device has it already
                if seq > target.joined_seq:
                    self._merge(target, conversation, seq)

    def _merge(self, target: PushTarget, conversation: bytes, seq: int) -> None:
        if target.provider not in self.config.providers:
            # Registration refuses unknown providers; this is a provider removed since.
            self.stats.failed += 1
            if target.provider not in self._unknown:
                self._unknown.add(target.provider)
                log.warning("push provider %r is not configured", target.provider)
            return
        key = (target.user, target.device)
        entry = self._pending.get(key)
        if entry is not None:
            # Waiting, retrying or in flight: the next request carries the newest position.
            self.stats.coalesced += 1
            entry.target = target  # a re-registration may have changed the token
            if conversation != entry.conversation or seq > entry.seq:
                entry.conversation, entry.seq = conversation, seq
            entry.count += 1
        elif len(self._pending) >= self.config.queue_limit:
            self.stats.dropped += 1
        else:
            entry = _Entry(target, conversation, seq, 1)
            self._pending[key] = entry
            # Coalescing window from the first message: a burst becomes one push.
            self._schedule(entry, self.config.coalesce_s)

    # --- scheduling ------------------------------------------------------------

    def _schedule(self, entry: _Entry, delay: float) -> None:
        self._order += 1
        heapq.heappush(self._heap, (trio.current_time() + delay, self._order, entry))
        self._wake.set()

    def _take_due(self) -> list[_Entry]:
        free = self.config.concurrency - self._busy
        now = trio.current_time()
        taken: list[_Entry] = []
        while self._heap and len(taken) < free and self._heap[0][0] <= now:
            taken.append(heapq.heappop(self._heap)[2])
        self._busy += len(taken)
        return taken

    async def _scheduler(self, hand: trio.MemorySendChannel[_Entry]) -> None:
        while True:
            due = self._take_due()
            if due:
                await self._dispatch(due, hand)
                continue
            # No await between _take_due() and here, so no wake-up is lost.
            self._wake = trio.Event()
            full = self._busy >= self.config.concurrency
            deadline = self._heap[0][0] if self._heap and not full else float("inf")
            with trio.move_on_at(deadline):
                await self._wake.wait()

    async def _dispatch(self, due: list[_Entry], hand: trio.MemorySendChannel[_Entry]) -> None:
        pairs = [(e.target.user, e.target.device) for e in due]
        connected = await self._call("online", self._online, pairs)
        for entry, pair in zip(due, pairs, strict=True):
            if connected is None:
                self.stats.failed += 1  # the presence lookup keeps failing: give up
                self._finish(entry)
            elif pair in connected:
                self.stats.online += 1  # connected: it gets the message live
                self._finish(entry)
            else:
                # Never blocks: the channel holds `concurrency` and _busy counts these.
                hand.send_nowait(entry)

    def _finish(self, entry: _Entry) -> None:
        del self._pending[(entry.target.user, entry.target.device)]
        self._release()

    def _release(self) -> None:
        self._busy -= 1
        self._wake.set()

    # --- sending -----------------------------------------------------------------

    async def _sender(self, take: trio.MemoryReceiveChannel[_Entry]) -> None:
        async for entry in take:
            try:
                await self._deliver(entry)
            except Exception as exc:  # a bug: told once; the sender lives on
                self.incidents.report("push", exc, "delivering a push")

    async def _deliver(self, entry: _Entry) -> None:
        target, sent = entry.target, entry.count
        try:
            outcome, retry_after = await self._post(entry)
        except Exception as exc:
            # An entry this code cannot turn into a request: dropped (logged once,
            # counted), never retried; the other devices' pushes go on.
            self.stats.poisoned += 1
            self.incidents.drop("push", exc, _tag(target))
            self._finish(entry)
            return
        if outcome in ("ok", "permanent"):
            self.stats.sent += outcome == "ok"
            self.stats.failed += outcome == "permanent"
            entry.count -= sent
            entry.attempts = 0
            if entry.count > 0:  # more arrived while in flight: push those next
                self._schedule(entry, self.config.coalesce_s)
                self._release()
            else:
                self._finish(entry)
        elif outcome == "gone":
            self.stats.gone += 1
            self._finish(entry)
            if self._on_gone is not None:
                await self._call("on_gone", self._on_gone, target)
        else:
            self._retry(entry, retry_after)

    def _retry(self, entry: _Entry, retry_after: float | None) -> None:
        entry.attempts += 1
        if entry.attempts >= self.config.max_attempts:
            self.stats.failed += 1
            log.warning("push gave up after %d attempts (%s)", entry.attempts, _tag(entry.target))
            self._finish(entry)
            return
        self.stats.retried += 1
        cfg = self.config
        delay = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (entry.attempts - 1))
        delay *= random.uniform(0.5, 1.0)  # jitter: retries of many devices spread out
        if retry_after is not None:
            delay = max(delay, min(retry_after, _RETRY_AFTER_CAP_S))
        self._schedule(entry, delay)
        self._release()

    def _request(self, entry: _Entry) -> tuple[str, bytes, dict[str, str]]:
        t = entry.target
        body = json.dumps(
            {
                "provider": t.provider,
                "zone": t.zone,
                "token": t.token,
                "device": t.device,
                "conversation": entry.conversation.hex(),
                "seq": entry.seq,
                "count": entry.count,
            },
            separators=(",", ":"),
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.config.secret:
            mac = hmac.new(self.config.secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-Relay-Signature"] = f"sha256={mac}"
        return self.config.providers[t.provider], body, headers

    async def _post(self, entry: _Entry) -> tuple[str, float | None]:
        """One attempt: ``(outcome, retry_after)``, outcome ok/gone/permanent/retry."""
        assert self._client is not None
        url, body, headers = self._request(entry)
        # The deadline is a Trio cancel scope (httpx timeouts are off): it bounds
        # connect, pool wait and body alike.
        with trio.move_on_after(self.config.attempt_timeout_s):
            try:
                response = await self._client.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                log.info("push attempt failed: %s (%s)", type(exc).__name__, _tag(entry.target))
                return "retry", None
            return _classify(response)
        log.info("push attempt timed out (%s)", _tag(entry.target))
        return "retry", None

    # --- callbacks and lifetime -----------------------------------------------------

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[Any]], arg: Any) -> Any:
        """Call resolve/online/on_gone; a storage outage must not kill the worker."""
        for attempt in range(1, _CALLBACK_ATTEMPTS + 1):
            with trio.move_on_after(self.config.callback_timeout_s):
                try:
                    return await fn(arg)
                except Exception as exc:  # RelayError expected; anything else is logged too
                    log.warning("push %s failed (%s): %s", what, type(exc).__name__, exc)
            if attempt < _CALLBACK_ATTEMPTS:
                await trio.sleep(_CALLBACK_BACKOFF_S * attempt)
        log.warning("push %s: giving up after %d attempts", what, _CALLBACK_ATTEMPTS)
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Push until cancelled; owns the HTTP client and every task."""
        n = self.config.concurrency
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        client = httpx.AsyncClient(timeout=None, limits=limits)
        self._client = client
        hand, take = trio.open_memory_channel[_Entry](n)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._intake_loop)
                nursery.start_soon(self._scheduler, hand)
                for _ in range(n):
                    nursery.start_soon(self._sender, take)
                task_status.started()
        finally:
            # Shielded and bounded: run() is usually leaving because it was cancelled.
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await client.aclose()


def _classify(response: httpx.Response) -> tuple[str, float | None]:
    status = response.status_code
    if 200 <= status < 300:
        return "ok", None
    if status == 410:
        return "gone", None
    if status in (408, 429) or status >= 500:
        retry_after = None
        if status in (429, 503):
            retry_after = _seconds(response.headers.get("retry-after"))
        return "retry", retry_after
    log.warning("push refused with HTTP %d; not retried", status)
    return "permanent", None


def _seconds(value: str | None) -> float | None:
    """A numeric Retry-After; an HTTP date is ignored (the backoff applies)."""
    try:
        seconds = float(value or "")
    except ValueError:
        return None
    return seconds if seconds >= 0 else None  # NaN compares False too
