"""Stage tracing for one latency run (diagnosis only): records, per batch, the first
record's send time (bench values start with it) and when each stage saw it.

Seventh session's version of ../s6/trace_sitecustomize.py: it keeps the batch bytes
and decodes them only when dumping (the s6 tracer decoded on the hot path, ~0.1 ms
per stage at low load), and adds stages: the leader's append done (A), the follower
session's read (B), the follower's decode of the answer (G), the leader seeing the
follower's durable end (H), and the consumer's long-poll waking (W). Run it with
trace_run.sh."""

import atexit
import os
import signal
import struct
import sys
import time

_T = struct.Struct(">q")
_rows = []


def _dump(*_):
    with open(f"/tmp/trace/out-{os.getpid()}.txt", "w") as f:
        for r in _rows:
            r = list(r)
            if r[0] == "W":
                f.write(f"W 0 {r[2]}\n")
                continue
            if isinstance(r[1], tuple):
                r[1] = _first_send_now(*r[1])
                if not r[1]:
                    continue
            f.write(" ".join(map(str, r)) + "\n")


def _lazy(data, offset=0):
    return (bytes(data), offset)


def _first_send(data, offset=0):
    return (bytes(data), offset)


def _first_send_now(data, offset=0):
    from tidemq.wire.batch import decode_fetch

    try:
        m = decode_fetch(bytes(data), offset).messages
    except Exception:
        return None
    if not m or m[0].value is None or len(m[0].value) < 8:
        return None
    v = _T.unpack_from(m[0].value)[0]
    return v if v > 0 else None


def _install():
    argv = " ".join(sys.argv)
    now = time.monotonic_ns
    if " broker" in argv:
        import tidemq.broker.follower as fol
        import tidemq.broker.server as srv

        orig_pe = srv.Broker.produce_entry

        async def produce_entry(self, entry, acks):
            t0 = now()
            s = _first_send(entry.batches)
            r = await orig_pe(self, entry, acks)
            if s:
                _rows.append(("P", s, t0, now()))
            return r

        srv.Broker.produce_entry = produce_entry
        orig_fe = srv.Broker._fetch_entry

        def _fetch_entry(self, wanted, budget):
            e = orig_fe(self, wanted, budget)
            if e is not None and e.batches:
                s = _first_send(e.batches, wanted.offset)
                if s:
                    _rows.append(("C", s, now()))
            return e

        srv.Broker._fetch_entry = _fetch_entry
        last = {}
        orig_ae = fol.FetchSession._apply_entry

        def _apply_entry(self, replica, entry):
            t = now()
            if entry.batches:
                s = _first_send(entry.batches)
                if s:
                    _rows.append(("F", s, t))
                    last[id(replica)] = s
            return orig_ae(self, replica, entry)

        fol.FetchSession._apply_entry = _apply_entry
        orig_ad = fol._all_durable

        async def _all_durable(appended):
            await orig_ad(appended)
            t = now()
            for replica, _ in appended:
                s = last.pop(id(replica), None)
                if s:
                    _rows.append(("D", s, t))

        fol._all_durable = _all_durable

        import tidemq.broker.partition as part

        pend = {}
        orig_app = part.PartitionReplica.append

        def append(self, body, acks, now_ms):
            s = _first_send(body)
            r = orig_app(self, body, acks, now_ms)
            if s:
                _rows.append(("A", s, now()))
                pend.setdefault(id(self), []).append((r[1] + 1, s))
            return r

        part.PartitionReplica.append = append
        orig_ff = part.PartitionReplica.follower_fetched

        def follower_fetched(self, broker_id, offset, durable_offset):
            lst = pend.get(id(self))
            if lst:
                t = now()
                while lst and lst[0][0] <= durable_offset:
                    _rows.append(("H", lst.pop(0)[1], t))
            return orig_ff(self, broker_id, offset, durable_offset)

        part.PartitionReplica.follower_fetched = follower_fetched
        orig_rr = srv.Broker._replica_reads

        def _replica_reads(self, followed, max_bytes):
            r = orig_rr(self, followed, max_bytes)
            t = now()
            for e in r[0]:
                if e.batches:
                    s = _first_send(e.batches)
                    if s:
                        _rows.append(("B", s, t))
            return r

        srv.Broker._replica_reads = _replica_reads
        orig_drf = fol.decode_replica_fetch

        def decode_replica_fetch(body):
            t = now()
            r = orig_drf(body)
            for e in r:
                if e.batches:
                    s = _first_send(e.batches)
                    if s:
                        _rows.append(("G", s, t))
            return r

        fol.decode_replica_fetch = decode_replica_fetch
        orig_ud = srv.until_done

        async def until_done(*a, **k):
            try:
                return await orig_ud(*a, **k)
            finally:
                _rows.append(("W", 0, now()))

        srv.until_done = until_done
        signal.signal(signal.SIGUSR2, _dump)
    else:
        import tidemq.client.fetcher as fe

        orig = fe.decode_records

        def decode_records(data, *a, **k):
            t = now()
            r = orig(data, *a, **k)
            if r.messages and r.messages[0].value and len(r.messages[0].value) >= 8:
                s = _T.unpack_from(r.messages[0].value)[0]
                if s > 0:
                    _rows.append(("R", s, t))
            return r

        fe.decode_records = decode_records
        import tidemq.client.producer as pr

        orig_enc = pr.encode_produce

        def encode_produce(entries, *a, **k):
            t = now()
            for e in entries:
                s = _first_send(e[3])
                if s:
                    _rows.append(("S", s, t))
            return orig_enc(entries, *a, **k)

        pr.encode_produce = encode_produce
        atexit.register(_dump)


try:
    _install()
except Exception as e:
    print("trace install failed", e, file=sys.stderr)
