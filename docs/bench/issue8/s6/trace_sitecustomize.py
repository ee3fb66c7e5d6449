"""Stage tracing for one latency run (diagnosis only): records, per batch, the first
record's send time (bench values start with it) and when each stage saw it."""

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
            f.write(" ".join(map(str, r)) + "\n")


def _first_send(data, offset=0):
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
