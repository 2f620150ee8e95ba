"""One service per ``redis.prefix``: a lease in Redis that a run takes at its start and renews while it runs.

Two services on one prefix write the same keys (a camera's frames of both runs in its stream, track ids colliding,
``hv:cameras`` mixing both) and read the control stream as the same consumer. Looking for camera statuses that beat
(``App.refuse_a_twin``) cannot see a twin that is itself still starting (20-40 s of Ray and model loading) nor one
with no cameras, so two started together both ran. The lease key ``{prefix}:service`` is taken with SET NX PX
(atomic: of two runs started at the same moment exactly one gets it), renewed every RENEW_S by a daemon thread
while the run lives, and deleted at a clean stop. A run killed with kill -9 renews it no more: it expires within
LEASE_TTL_S, which a restart right after waits out instead of being refused.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import weakref
from typing import Callable

import redis

from workers.redact import redact_url

log = logging.getLogger(__name__)

# The holder renews every RENEW_S; the lease outlives LEASE_TTL_S / RENEW_S - 1 missed renewals (a controller's
# stall, a Redis blip), and a restart after a kill -9 waits at most LEASE_TTL_S for it.
LEASE_TTL_S = 6.0
RENEW_S = 1.0
POLL_S = 0.2  # how often a start that found the lease taken looks at it again

# Ours: PEXPIRE; nobody's (it expired in an outage, or Redis restarted empty): SET again; another run's: its value,
# never touched (a run must not renew, nor delete, another's lease).
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return v
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lease_key(prefix: str) -> str:
    return f"{prefix}:service"


def holder(value: bytes | str | None) -> str:
    """Who holds a lease, from its value, for a message: "run 3f2a..., pid 4242 on host cam-box"."""
    try:
        v = json.loads(value)
        return f"run {v['run']}, pid {v['pid']} on host {v['host']}"
    except (TypeError, ValueError, KeyError):
        return "a run of another version, or not a hydravision service"


class Taken(Exception):
    """The lease is another running service's."""

    def __init__(self, who: str, no_expiry: bool = False) -> None:
        super().__init__(who)
        self.who, self.no_expiry = who, no_expiry


class ServiceLease:
    """This run's lease on ``prefix`` at the Redis of ``url``: ``acquire()`` at the start, ``start()`` to renew it
    (and to take it once Redis answers, where it did not at the start), ``release()`` at the stop."""

    def __init__(self, url: str, prefix: str, run: str, say: Callable[[str], None] = print,
                 ttl_s: float = LEASE_TTL_S, renew_s: float = RENEW_S) -> None:
        self.url, self.prefix, self.key, self.say = url, prefix, lease_key(prefix), say
        self.ttl_ms, self.renew_s = int(ttl_s * 1000), renew_s
        self.value = json.dumps({"run": run, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._renew = self._client.register_script(_RENEW)
        self._release = self._client.register_script(_RELEASE)
        # Held by a renewal's Redis call and by release(): a renewal under way when the run stops cannot SET the lease
        # again after release() deleted it (the next start would wait it out for nothing).
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_to: str | None = None  # the value of another run's lease found at a renewal (said once)
        self.refused = False  # a renewal Redis refused (said once)

    def acquire(self) -> None:
        """Takes the lease, or raises Taken where a running service holds it (it renews it: its TTL goes up, or it
        outlives the TTL it had when first read). One that is not renewed (its run was killed a moment ago) is
        waited out; RedisError where Redis stops answering meanwhile."""
        seen: bytes | None = None
        last_ttl = 0
        expires = 0.0
        while True:
            try:
                if self._client.set(self.key, self.value, nx=True, px=self.ttl_ms):
                    return
            except redis.ResponseError:  # refused (Redis out of memory refuses SET NX whether or not the key is
                if not self._client.exists(self.key):  # there): a held lease is still read and told apart below
                    raise  # nobody's: the start goes on, the renewals take it once Redis accepts writes
            # not MULTI: Redis out of memory refuses a transaction, reads and all
            value, ttl = self._client.pipeline(transaction=False).get(self.key).pttl(self.key).execute()
            if value is None or ttl == -2:  # expired (or released) meanwhile: try again at once
                continue
            if ttl < 0:  # set without an expiry, not by a hydravision service: it would refuse every start for ever
                raise Taken(holder(value), no_expiry=True)
            now = time.monotonic()
            if seen is None:
                seen, expires = value, now + ttl / 1000
                self.say(f"redis.prefix {self.prefix!r} on {redact_url(self.url)} is held by another hydravision "
                         f"service ({holder(value)}): waiting up to {ttl / 1000:.1f} s to tell one that runs (this "
                         "start is then refused) from one killed a moment ago (its hold then expires) ...")
            elif value != seen or ttl > last_ttl or now > expires + 1.0:
                raise Taken(holder(value))  # another run took it meanwhile, or its holder renews it: both run
            last_ttl = ttl
            time.sleep(min(POLL_S, ttl / 1000 + 0.01))

    def start(self) -> "ServiceLease":
        """Renews the lease from now on (once: a second call changes nothing)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=_renewing, args=(weakref.ref(self), self._stop, self.renew_s),
                                        name="hydravision-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> None:
        """One renewal: ours again, or taken where nobody's (Redis was down at the start, or restarted empty). Found
        another run's: an ERROR line naming it, once (not fatal: the renewals go on, and take it back once freed)."""
        with self._lock:
            if self._stop.is_set():
                return
            try:
                got = self._renew(keys=[self.key], args=[self.value, self.ttl_ms])
            except redis.ResponseError as e:  # refused, not lost (an ACL without scripting): said once
                if not self.refused:
                    self.refused = True
                    log.warning("redis.prefix %r: the lease %s cannot be renewed (%s): a second service started on "
                                "this prefix would not be refused", self.prefix, self.key, e)
                return
            except redis.RedisError:  # an outage: the publishers retry, so do we at the next renewal
                log.debug("lease %s not renewed", self.key, exc_info=True)
                return
        if got == 1:
            if self.lost_to is not None:
                log.warning("redis.prefix %r on %s: this service holds the prefix again (%s stopped)", self.prefix,
                            redact_url(self.url), holder(self.lost_to))
                self.lost_to = None
        elif got != self.lost_to:
            self.lost_to = got
            log.error("redis.prefix %r on %s is held by another hydravision service (%s; Redis restarted without "
                      "its data, or was not reachable or out of memory when this one started?): both write the same "
                      "keys and read the same control stream; stop one of them", self.prefix, redact_url(self.url),
                      holder(got))

    def release(self) -> None:
        """Stops the renewals and deletes the lease where it is still this run's: a restart need not wait."""
        if self._stop.is_set():  # released already (a start refused for a twin of an older version)
            return
        self._stop.set()
        with self._lock:
            try:
                self._release(keys=[self.key], args=[self.value])
            except redis.RedisError:  # it expires within the TTL
                log.debug("lease %s not released", self.key, exc_info=True)
            finally:
                self._client.close()
        if self._thread is not None:
            self._thread.join(5)


def _renewing(ref: weakref.ref, stop: threading.Event, every_s: float) -> None:
    """The renewal thread: until release(), or until nothing holds the lease any more (an App dropped without a
    shutdown: its renewals went on taking the lease in whatever Redis came to answer on that URL)."""
    while (lease := ref()) is not None:
        lease.renew()
        del lease
        if stop.wait(every_s):
            return
