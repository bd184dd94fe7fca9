"""Protocol checks of the `kv` guest (DESIGN.md section 6), shared by the TAP and
user-mode-forward tests so both paths are held to the same contract."""

from __future__ import annotations

from kemari_agent.kvclient import KvClient


def check_put_get_incr(c: KvClient) -> None:
    assert c.get("nokey").kind == "NONE"
    r = c.put("colour", "blue")
    assert (r.kind, r.value) == ("OK", None)
    assert c.get("colour").value == "blue"
    assert c.put("colour", "green").kind == "OK"
    assert c.get("colour").value == "green"
    assert [c.incr("hits").value for _ in range(3)] == ["1", "2", "3"]
    assert c.get("hits").value == "3"
    long_key, long_value = "k" * 64, "v" * 64
    assert c.put(long_key, long_value).kind == "OK"
    assert c.get(long_key).value == long_value


def check_retried_ids(c: KvClient) -> None:
    first = c.incr("retry-counter", req_id="retry-1")
    again = c.incr("retry-counter", req_id="retry-1")
    assert first == again and first.value == "1"
    assert c.incr("retry-counter").value == "2"          # a new id executes
    put = c.put("r", "one", req_id="retry-2")
    assert c.put("r", "two", req_id="retry-2") == put     # replayed, not executed
    assert c.get("r").value == "one"
    get1 = c.get("r", req_id="retry-3")
    c.put("r", "three")
    assert c.get("r", req_id="retry-3") == get1           # the remembered reply
    assert c.get("r").value == "three"


MALFORMED = [
    b"",
    b"HELLO",
    b"PUT",
    b"PUT id-only",
    b"PUT id key",                 # no value
    b"PUT id key value extra",
    b"GET id",
    b"INCR id a b",
    b"put id key value",           # verbs are upper case
    b"PUT id " + b"k" * 65 + b" v",
    b"PUT id k " + b"v" * 65,
    b"PUT " + b"i" * 33 + b" k v",
    b"PUT id k\x01 v",
    b"GET id key\x00",
    b"\xff\xfe\xfd",
]


def check_malformed(c: KvClient) -> None:
    for payload in MALFORMED:
        reply = c.raw(payload)
        assert reply is not None and reply.startswith(b"ERR "), (payload, reply)
    c.put("word", "text")
    assert c.incr("word").kind == "ERR"                    # not a number
    assert c.get("word").value == "text"                   # ...and unchanged


def check_oversize(c: KvClient) -> None:
    reply = c.raw(b"PUT big key " + b"x" * 1300)
    assert reply is not None and reply.startswith(b"ERR"), reply
    assert c.raw(b"PUT huge key " + b"x" * 5000, timeout=0.5) is None   # fragments: dropped
    assert c.put("after-oversize", "fine").kind == "OK"    # and the guest is fine
    assert c.get("after-oversize").value == "fine"


def check_all(c: KvClient) -> None:
    check_put_get_incr(c)
    check_retried_ids(c)
    check_malformed(c)
    check_oversize(c)
