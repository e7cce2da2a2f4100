"""The prefix-aware router (rocmforge.router) and KV events between processes
(rocmforge.kv_events): block_keys against the README's vectors, mirrors built
from events alone equal to each manager's lookup_prefix after replays with
evictions and resets, routing by longest prefix then load, the wire format,
and a publisher in another process over ZMQ."""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import rocmforge as rf
from rocmforge import kv_events
from rocmforge.router import PrefixRouter, block_keys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_block_keys_match_the_documented_vectors():
    assert [hex(k) for k in block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4)] == ["0x2ac72734081de0f5", "0x22e6517f8d7ea24"]
    assert [hex(k) for k in block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4, "tenant-a")] == [
        "0x49b0637f34a795b5", "0x7cb6e3aceac50f6e"]
    assert [hex(k) for k in block_keys([-1, 2**31 - 1, -2**31, 5], 4, b"x")] == ["0x61fd7471bef2a27d"]
    assert block_keys([1, 2, 3], 4).size == 0
    with pytest.raises(rf.InvalidConfiguration):
        block_keys([1], 0)
    with pytest.raises(rf.ArgumentTypeError):
        block_keys([1.5], 4)


def managers(n, num_blocks=24, block_size=4, policy="lru", host=0):
    return [rf.BlockManager(num_blocks, block_size, enable_prefix_caching=True, enable_events=True,
                            eviction_policy=policy, host_cache_blocks=host) for _ in range(n)]


def prompts(rng, count, stems, block_size=4):
    """Prompts over a few shared stems, so prefixes repeat and evictions happen."""
    out = []
    for _ in range(count):
        stem = stems[rng.integers(0, len(stems))]
        tail = rng.integers(0, 50, size=rng.integers(0, 3 * block_size)).tolist()
        out.append(stem + tail)
    return out


@pytest.mark.parametrize("host", [0, 12], ids=["pool", "pool+host"])
@pytest.mark.parametrize("policy", ["lru", "arc"])
def test_mirrors_equal_each_managers_lookup_after_a_replay_with_evictions(policy, host):
    rng = np.random.default_rng(7)
    ms = managers(3, policy=policy, host=host)
    router = PrefixRouter(4, ["a", "b", "c"])
    names = router.instances
    stems = [rng.integers(0, 50, size=4 * rng.integers(1, 5)).tolist() for _ in range(6)]
    probes = prompts(rng, 40, stems)
    live = {name: [] for name in names}
    next_id = 0
    for step, prompt in enumerate(prompts(rng, 400, stems)):
        name = names[rng.integers(0, 3)] if step % 3 else router.route(prompt)
        m = ms[names.index(name)]
        try:
            m.add_sequence(next_id, prompt)
            live[name].append(next_id)
            next_id += 1
        except rf.OutOfBlocks:
            pass
        if len(live[name]) > 2:                               # release old sequences: their blocks stay cached
            m.remove_sequence(live[name].pop(0))
        m.take_pending_copies()                               # no data here: the copies are bookkeeping
        if step == 250:
            m.reset_prefix_cache()
        router.apply(name, m.take_events())
        if step % 50 == 49:
            for other, mm in zip(names, ms):
                router.apply(other, mm.take_events())
                for p in probes:
                    assert router.match(p)[other] == mm.lookup_prefix(p)
    assert all(m.stats()["cached_blocks_evicted"] > 20 for m in ms)     # the mirrors followed evictions
    if host:
        assert all(m.stats()["host_hit_tokens"] > 0 for m in ms)      # and hits from the host tier
        assert all(router.cached_keys(n, "cpu") for n in names)
    assert all(len(router.cached_keys(n)) for n in names)
    hits = [sum(router.match(p)[n] > 0 for p in probes) for n in names]
    assert all(h > 0 for h in hits)                                  # the probes did hit


def test_route_takes_the_longest_prefix_then_the_least_load():
    ms = managers(2)
    router = PrefixRouter(4)
    for name in ("x", "y"):
        router.add_instance(name)
    shared = [1, 2, 3, 4, 5, 6, 7, 8]
    ms[0].add_sequence(0, shared + [9])
    ms[1].add_sequence(0, shared[:4] + [0, 0, 0, 0, 9])
    for name, m in zip(("x", "y"), ms):
        router.apply(name, m.take_events())
    assert router.match(shared + [1, 1]) == {"x": 8, "y": 4}
    assert router.route(shared + [1, 1]) == "x"
    assert router.route([7, 7, 7, 7, 7]) == "x"                 # no hit anywhere: the first added
    router.set_load("x", 3)
    assert router.route([7, 7, 7, 7, 7]) == "y"                 # then the least loaded
    assert router.route(shared) == "x"                          # a longer prefix beats load
    router.max_imbalance = 2
    assert router.route(shared) == "y"                          # unless x is too far ahead
    router.set_load("y", 1)
    assert router.route(shared) == "x"
    router.max_imbalance = None
    ms[0].reset_prefix_cache()
    router.apply("x", ms[0].take_events())
    assert router.match(shared) == {"x": 0, "y": 4}
    salted = managers(1)[0]
    salted.add_sequence(0, shared + [1], salt="t")
    router.add_instance("z")
    router.apply("z", salted.take_events())
    assert router.match(shared, salt="t")["z"] == 8 and router.match(shared)["z"] == 0
    router.remove_instance("z")
    assert router.instances == ["x", "y"]
    assert PrefixRouter(4).route(shared) is None


def test_router_refuses_bad_input():
    router = PrefixRouter(4, ["a"])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(rf.ArgumentValueError):
            PrefixRouter(bad)
    for bad in (-1, float("nan")):
        with pytest.raises(rf.ArgumentValueError):
            PrefixRouter(4, max_imbalance=bad)
    with pytest.raises(rf.ArgumentValueError):
        router.add_instance("a")
    with pytest.raises(rf.ArgumentValueError):
        router.apply("nobody", [])
    with pytest.raises(rf.ArgumentValueError):
        router.apply("a", ["not an event"])
    with pytest.raises(rf.ArgumentValueError):
        router.set_load("nobody", 1)
    with pytest.raises(rf.ArgumentValueError):
        router.remove_instance("nobody")


def test_the_wire_format_round_trips_and_rejects_garbage():
    events = [rf.BlockStored(5, None, 4), rf.BlockStored(6, 5, 4, "cpu"), rf.BlockRemoved(5),
              rf.BlockRemoved(6, "cpu"), rf.AllCleared()]
    payload = kv_events.encode_batch(events, "gpu-0", ts=12.5)
    raw = json.loads(payload)
    assert raw[0] == 12.5 and raw[2] == "gpu-0"
    assert raw[1][0] == ["BlockStored", [5], None, [], 4, None, "gpu"] and raw[1][4] == ["AllBlocksCleared"]
    assert raw[1][1][-1] == "cpu" and raw[1][3] == ["BlockRemoved", [6], "cpu"]
    assert kv_events.decode_batch(payload) == (12.5, events, "gpu-0")
    for bad in (b"", b"[1, 2]", b'[0, [["Nope"]], "a"]', b'[0, [["BlockStored"]], "a"]', b"\xff",
                b'[0, [["BlockRemoved", [1], "disk"]], "a"]', b'[{}, [], "a"]', b'[0, [], {}]', b'[0, [], [[1]]]',
                b'[0, [["BlockRemoved", ["1.5"], "gpu"]], "a"]'):
        with pytest.raises(ValueError):
            kv_events.decode_batch(bad)
    with pytest.raises(rf.ArgumentValueError):
        kv_events.encode_batch(["x"], "a")


PUBLISHER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import rocmforge as rf
    from rocmforge.kv_events import EventPublisher
    m = rf.BlockManager(16, 4, enable_prefix_caching=True, enable_events=True)
    pub = EventPublisher(m, "tcp://127.0.0.1:*", instance="child")
    print(pub.endpoint, flush=True)
    assert pub.wait_for_subscriber(20000)         # nothing published before the parent listens
    rng = np.random.default_rng(1)
    stems = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9]]
    probes = [s + [0] for s in stems] + [[1, 2, 3, 4, 0]]
    for i in range(60):
        m.add_sequence(i, stems[i % 2] + rng.integers(0, 9, size=5).tolist())
        if i >= 2:
            m.remove_sequence(i - 2)
        pub.publish()
    print(json.dumps([m.lookup_prefix(p) for p in probes]), flush=True)
    sys.stdin.readline()
    pub.close()
""")


def test_a_router_mirrors_a_manager_in_another_process_over_zmq():
    pytest.importorskip("zmq")
    child = subprocess.Popen([sys.executable, "-c", PUBLISHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=ROOT / "tests")
    try:
        endpoint = child.stdout.readline().strip()
        router = PrefixRouter(4)
        with kv_events.EventSubscriber([endpoint]) as sub:
            want = json.loads(child.stdout.readline())
            for _ in range(100):
                sub.feed(router, timeout_ms=20)
                if "child" in router.instances and [router.match(p)["child"] for p in (
                        [1, 2, 3, 4, 5, 6, 7, 8, 0], [9, 9, 9, 9, 0], [1, 2, 3, 4, 0])] == want:
                    break
            assert sub.missed == 0 and sub.malformed == 0
        got = [router.match(p)["child"] for p in ([1, 2, 3, 4, 5, 6, 7, 8, 0], [9, 9, 9, 9, 0], [1, 2, 3, 4, 0])]
        assert got == want and want[0] == 8
    finally:
        child.stdin.write("done\n")
        child.stdin.flush()
        child.wait(timeout=30)


def test_a_publisher_needs_a_manager_with_events():
    pytest.importorskip("zmq")
    with pytest.raises(rf.ArgumentValueError, match="enable_events"):
        kv_events.EventPublisher(rf.BlockManager(4, 4, enable_prefix_caching=True), "tcp://127.0.0.1:*")


def test_a_subscriber_counts_missed_and_malformed_batches():
    pytest.importorskip("zmq")
    m = rf.BlockManager(8, 4, enable_prefix_caching=True, enable_events=True)
    with kv_events.EventPublisher(m, "tcp://127.0.0.1:*", instance="p") as pub:
        assert not pub.wait_for_subscriber(50)                       # nobody yet
        with kv_events.EventSubscriber([pub.endpoint]) as sub:
            assert pub.wait_for_subscriber(10000)
            router = PrefixRouter(4)
            m.add_sequence(0, [1, 2, 3, 4, 5])
            assert pub.publish() == 1 and pub.publish() == 0          # nothing new: nothing sent
            raw = pub._socket
            raw.send_multipart([b"kv", b"\x00" * 7 + b"\x05", kv_events.encode_batch([], "p")])   # seq 5, not 1
            raw.send_multipart([b"kv", b"short", b"[]"])
            raw.send_multipart([b"kv", b"\x00" * 8, b"not json"])
            for _ in range(50):
                sub.feed(router, timeout_ms=20)
                if sub.malformed == 2:
                    break
            assert sub.missed == 4 and sub.malformed == 2
            assert router.match([1, 2, 3, 4]) == {"p": 4}
            m.add_sequence(1, [4, 4, 4, 4])
            pub.publish()
            got = []
            for _ in range(50):
                got += sub.receive(timeout_ms=20)
                if got:
                    break
            assert got == [("p", [rf.BlockStored(int(block_keys([4, 4, 4, 4], 4)[0]), None, 4)])]
            zmq = pytest.importorskip("zmq")

            class Broken:                       # a send that fails once, as a closing context's would
                def send_multipart(self, frames):
                    raise zmq.ZMQError(zmq.ETERM)
            pub._socket = Broken()
            m.add_sequence(2, [7, 7, 7, 7])
            with pytest.raises(zmq.ZMQError):
                pub.publish()                   # its events are gone: the subscriber must learn it
            pub._socket = raw
            m.add_sequence(3, [8, 8, 8, 8])
            pub.publish()
            for _ in range(50):
                if sub.receive(timeout_ms=20):
                    break
            assert sub.missed == 5                  # the four skipped before, and the lost batch


def test_a_block_stays_routed_while_either_tier_holds_it():
    router = PrefixRouter(4, ["x"])
    k = int(block_keys([1, 2, 3, 4], 4)[0])
    router.apply("x", [rf.BlockStored(k, None, 4), rf.BlockStored(k, None, 4, "cpu"), rf.BlockRemoved(k)])
    assert router.match([1, 2, 3, 4]) == {"x": 4}
    assert router.cached_keys("x", "cpu") == {k} and router.cached_keys("x", "gpu") == frozenset()
    router.apply("x", [rf.BlockRemoved(k, "cpu"), rf.BlockRemoved(k, "cpu")])   # a repeat is harmless
    assert router.match([1, 2, 3, 4]) == {"x": 0} and router.cached_keys("x") == frozenset()
