"""KV events between processes over ZMQ (``pip install 'rocmforge[events]'``, pyzmq).

An instance publishes its manager's events; a router process subscribes to
every instance and feeds a ``rocmforge.router.PrefixRouter``::

    pub = EventPublisher(manager, "tcp://*:5557", instance="gpu-0")
    ...; pub.publish()                      # after each engine step: one batch
    sub = EventSubscriber(["tcp://host-a:5557", "tcp://host-b:5557"])
    sub.feed(router, timeout_ms=10)         # applies what arrived

The wire format follows vLLM's KV events where it fits: a ZMQ multipart
message ``[topic, seq, payload]`` with ``seq`` a big-endian uint64 counting
batches per publisher, and ``payload`` a JSON array ``[ts, events, instance]``
(vLLM encodes the same shape with msgpack). Events are tagged arrays:
``["BlockStored", [key], parent_key_or_null, [], num_tokens, null, medium]``,
``["BlockRemoved", [key], medium]`` and ``["AllBlocksCleared"]``; ``medium``
is the tier: "gpu" (the cache's own pool) or "cpu" (its host tier). A subscriber counts batches it
never saw (ZMQ drops messages for a subscriber that is slow or joins late) in
``missed``: a mirror that missed a batch may be out of date.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Dict, Hashable, Iterable, List, Optional, Tuple

from rocmforge.errors import ArgumentValueError
from rocmforge.events import AllCleared, BlockRemoved, BlockStored

__all__ = ["EventPublisher", "EventSubscriber", "decode_batch", "encode_batch"]


def _zmq():
    try:
        import zmq
    except ImportError:
        raise ImportError("rocmforge.kv_events needs pyzmq: pip install 'rocmforge[events]'") from None
    return zmq


def encode_batch(events: Iterable, instance: Hashable, ts: Optional[float] = None) -> bytes:
    """One batch of events as the payload frame."""
    out = []
    for ev in events:
        if isinstance(ev, BlockStored):
            out.append(["BlockStored", [ev.key], ev.parent_key, [], ev.num_tokens, None, ev.medium])
        elif isinstance(ev, BlockRemoved):
            out.append(["BlockRemoved", [ev.key], ev.medium])
        elif isinstance(ev, AllCleared):
            out.append(["AllBlocksCleared"])
        else:
            raise ArgumentValueError(f"not a KV event: {ev!r}")
    return json.dumps([time.time() if ts is None else ts, out, instance]).encode()


def _medium(value) -> str:
    """A tier name of the wire format ("gpu" or "cpu"; null, as vLLM may send, is "gpu")."""
    if value is None:
        return "gpu"
    if value not in ("gpu", "cpu"):
        raise ValueError(f"unknown medium {value!r}")
    return value


def decode_batch(payload: bytes) -> Tuple[float, List, Hashable]:
    """(ts, events, instance) of a payload frame; ValueError if it is malformed."""
    try:
        ts, raw, instance = json.loads(payload)
        ts = float(ts)
        if isinstance(instance, list):
            instance = tuple(instance)
        hash(instance)                          # a name the router can key by
        events = []
        for ev in raw:
            kind = ev[0]
            if kind == "BlockStored":
                events.extend(BlockStored(int(k), None if ev[2] is None else int(ev[2]), int(ev[4]), _medium(ev[6]))
                              for k in ev[1])
            elif kind == "BlockRemoved":
                events.extend(BlockRemoved(int(k), _medium(ev[2])) for k in ev[1])
            elif kind == "AllBlocksCleared":
                events.append(AllCleared())
            else:
                raise ValueError(f"unknown event {kind!r}")
    except (TypeError, IndexError, KeyError, ValueError) as exc:
        raise ValueError(f"malformed KV event batch: {exc}") from None
    return ts, events, instance


class _Endpoint:
    """A ZMQ socket's lifetime: close(), or a with block."""

    _socket = None

    def close(self) -> None:
        self._socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EventPublisher(_Endpoint):
    """Publishes a manager's KV events on a ZMQ publisher socket (XPUB) bound to ``endpoint``."""

    def __init__(self, manager, endpoint: str, *, instance: Hashable = None, topic: bytes = b"kv",
                 context=None):
        zmq = _zmq()
        if not manager.enable_events:
            raise ArgumentValueError("the manager records no events: create it with enable_events=True")
        self.manager = manager
        self.instance = endpoint if instance is None else instance
        self.topic = topic
        self._seq = 0
        # XPUB: a PUB socket that also hears subscriptions (wait_for_subscriber)
        self._socket = (context or zmq.Context.instance()).socket(zmq.XPUB)
        self._socket.setsockopt(zmq.LINGER, 1000)
        self._socket.bind(endpoint)
        self.subscribers = 0

    @property
    def endpoint(self) -> str:
        """The bound address (the real port when bound to a wildcard)."""
        return self._socket.getsockopt_string(_zmq().LAST_ENDPOINT)

    def wait_for_subscriber(self, timeout_ms: int = 10_000) -> bool:
        """Wait until a subscriber has subscribed to this topic (ZMQ drops what is
        published before a subscription lands); returns whether one did."""
        zmq = _zmq()
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            left = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._socket.poll(left):
                return self.subscribers > 0
            msg = self._socket.recv(zmq.NOBLOCK)
            if msg[:1] == b"\x01" and self.topic.startswith(msg[1:]):
                self.subscribers += 1
                return True

    def publish(self) -> int:
        """Send the events recorded since the last call as one batch; returns how many.
        A batch that cannot be sent (the error is raised) still takes its sequence
        number, so subscribers count it as missed and know their mirror is behind."""
        events = self.manager.take_events()
        if not events:
            return 0
        seq, self._seq = self._seq, self._seq + 1
        self._socket.send_multipart([self.topic, struct.pack(">Q", seq), encode_batch(events, self.instance)])
        return len(events)


class EventSubscriber(_Endpoint):
    """Receives batches from publishers (a SUB socket connected to each endpoint)."""

    def __init__(self, endpoints: Iterable[str], *, topic: bytes = b"kv", context=None):
        zmq = _zmq()
        self._zmq = zmq
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, topic)
        for endpoint in endpoints:
            self._socket.connect(endpoint)
        self._next: Dict[Hashable, int] = {}
        self.missed = 0
        self.malformed = 0

    def receive(self, timeout_ms: int = 0) -> List[Tuple[Hashable, List]]:
        """Every batch that has arrived, waiting up to timeout_ms for the first:
        a list of (instance, events). Malformed messages are counted and skipped."""
        out = []
        wait = timeout_ms
        while self._socket.poll(wait):
            wait = 0
            frames = self._socket.recv_multipart()
            try:
                if len(frames) != 3 or len(frames[1]) != 8:
                    raise ValueError("expected [topic, seq, payload]")
                seq = struct.unpack(">Q", frames[1])[0]
                _, events, instance = decode_batch(frames[2])
            except ValueError:
                self.malformed += 1
                continue
            expect = self._next.get(instance)
            if expect is not None and seq > expect:
                self.missed += seq - expect
            self._next[instance] = seq + 1
            out.append((instance, events))
        return out

    def feed(self, router, timeout_ms: int = 0) -> int:
        """Apply every arrived batch to router (instances it does not know are
        added); returns the number of events applied."""
        n = 0
        for instance, events in self.receive(timeout_ms):
            if instance not in router.instances:
                router.add_instance(instance)
            router.apply(instance, events)
            n += len(events)
        return n
