"""Memory soak under bad traffic: a server's RSS while clients send a mix of good and bad messages.

    nice -n 10 python bench/soak_bad_traffic.py [--messages 10000000] [--connections 8]
        [--every 500000] [--warmup 1000000] [--server-env MALLOC_ARENA_MAX=2]

Serves bench/_common.tiny_model (a 64x64 YOLO-shaped detector: valid inferences are cheap)
with `python -m vasipc.serve --threads 1`, and drives `--messages` messages from
`--connections` client processes, each pipelining up to PIPELINE messages on one
connection. The mix (MIX, by weight): valid `infer` (a frame-export directory, a raw
file), `health`, `info`; bodies that are not JSON, not UTF-8, not an object, nested too
deep; requests with wrong types or ranges, unknown ops, another model id, too long
request ids; frames that are missing (a fresh random path each time), outside the frame
roots, a FIFO, a directory without frame.data, a wrong size, an unsupported format, a bad
header version, another frame_id; zero and oversize length prefixes (the server answers
and closes); connections cut in the middle of a message, and connections closed with
their answers unread. Random strings (request ids, camera ids, paths, ops) are fresh in
every message, as a fuzzer's are.

Every `--every` messages it samples the server's VmRSS, its smaps_rollup (Rss, Anonymous),
open fds and threads. Verdict: RSS at the end and at every sample after `--warmup`
messages within `--tolerance` MB (5) of the sample at `--warmup`, fds back to the idle
count, no `internal` answer. Exit status 0 only then.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections import Counter

import orjson
from _common import machine, nv12_photo, server, tiny_model, vasipc_cmd, write_frames

PIPELINE = 32  # messages a client sends before it reads their answers
_LENGTH = struct.Struct(">I")
_META = struct.Struct("<IIQQIIIIQ16x")  # frame.meta (docs/contract.md 5.1)
WIDTH, HEIGHT = 160, 120


# --- the frames on disk ------------------------------------------------------------------------

def write_fixtures(root: str) -> dict[str, str]:
    """The frames the messages point at, by what they are, under `root` (in /dev/shm)."""
    good = write_frames(root, 2, WIDTH, HEIGHT)
    paths = {"dir": good[0], "dir2": good[1]}
    pixels = nv12_photo(WIDTH, HEIGHT).tobytes()
    paths["raw"] = os.path.join(root, "raw.nv12")
    with open(paths["raw"], "wb") as f:
        f.write(pixels)
    for name, version, fmt, size in (("bad_version", 0, 0, len(pixels)),
                                     ("bad_format", 1, 9, len(pixels)),
                                     ("short_data", 1, 0, len(pixels) // 2)):
        path = os.path.join(root, name)
        os.makedirs(path)
        with open(os.path.join(path, "frame.data"), "wb") as f:
            f.write(pixels[:size])
        with open(os.path.join(path, "frame.meta"), "wb") as f:
            f.write(_META.pack(version, 0, 7, time.time_ns(), WIDTH, HEIGHT, fmt, WIDTH, size))
        paths[name] = path
    paths["no_data"] = os.path.join(root, "no_data")
    os.makedirs(paths["no_data"])
    shutil.copy(os.path.join(good[0], "frame.meta"), paths["no_data"])
    paths["fifo"] = os.path.join(root, "fifo")
    os.mkfifo(paths["fifo"])
    return paths


# --- the messages ------------------------------------------------------------------------------

BIG_INT = "<an integer beyond 64 bits>"  # orjson writes no such int: put in as text
BIG_INT_JSON = b"1" + b"0" * 30


def _rand(rng: random.Random, n: int = 16) -> str:
    return f"{rng.getrandbits(4 * n):0{n}x}"


def _infer(rng: random.Random, ref: str, meta: dict | None = None, **extra) -> dict:
    msg = {"frame_reference": ref, "frame_metadata": meta if meta is not None else {},
           "camera_id": f"cam-{_rand(rng, 8)}", "model_id": "bench", "timestamp": time.time(),
           "request_id": _rand(rng)}
    msg.update(extra)
    return msg


def _raw_meta(**kw) -> dict:
    meta = {"width": WIDTH, "height": HEIGHT, "format": "NV12"}
    meta.update(kw)
    return meta


def _json(rng: random.Random, paths: dict[str, str], kind: str) -> dict | list | str | int:
    """A message of `kind` as a JSON value (before framing)."""
    r = rng
    if kind == "infer_dir":
        return _infer(r, paths[r.choice(("dir", "dir2"))])
    if kind == "infer_raw":
        return _infer(r, paths["raw"], _raw_meta())
    if kind == "health":
        return {"op": "health", "request_id": r.getrandbits(40)}
    if kind == "info":
        return {"op": "info"}
    if kind == "not_object":
        return r.choice(([1, 2, _rand(r)], _rand(r), r.getrandbits(60), None))
    if kind == "wrong_types":
        field, value = r.choice((("camera_id", 5), ("timestamp", "now"), ("timestamp", -1.0),
                                 ("frame_metadata", [1]), ("frame_reference", 3),
                                 ("config", {"confidence_threshold": 2.0}),
                                 ("config", {"classes": [_rand(r, 6)]}),
                                 ("deadline_ms", 0), ("timestamp", True),
                                 ("request_id", _rand(r, 130)), ("camera_id", ""),
                                 ("timestamp", BIG_INT), ("frame_reference", "rel/" + _rand(r))))
        msg = _infer(r, paths["dir"])
        msg[field] = value
        return msg
    if kind == "missing_field":
        msg = _infer(r, paths["dir"])
        del msg[r.choice(("frame_reference", "frame_metadata", "camera_id", "timestamp"))]
        return msg
    if kind == "unknown_op":
        return {"op": _rand(r, r.randint(1, 40)), "request_id": _rand(r)}
    if kind == "model_mismatch":
        return _infer(r, paths["dir"], model_id=f"model-{_rand(r, 8)}")
    if kind == "frame_missing":
        return _infer(r, f"/dev/shm/vasipc-missing-{_rand(r, 24)}/{_rand(r, 8)}")
    if kind == "frame_forbidden":
        return _infer(r, r.choice(("/etc/passwd", f"/tmp/{_rand(r)}", "/proc/self/mem",
                                   paths["fifo"], f"/var/{_rand(r, 30)}")))
    if kind == "frame_not_found_dir":
        return _infer(r, paths["no_data"])
    if kind == "raw_wrong_size":
        return _infer(r, paths["raw"], _raw_meta(width=2 * WIDTH, height=2 * HEIGHT))
    if kind == "raw_bad_offset":
        return _infer(r, paths["raw"], _raw_meta(offset=r.randint(1, 1 << 40)))
    if kind == "raw_bad_format":
        return _infer(r, paths["raw"], _raw_meta(format=_rand(r, 6)))
    if kind == "frame_invalid":
        return _infer(r, paths[r.choice(("bad_version", "short_data"))])
    if kind == "frame_unsupported":
        return _infer(r, paths["bad_format"])
    if kind == "frame_changed":
        return _infer(r, paths["dir"], {"frame_id": r.getrandbits(30) + 10})
    raise ValueError(kind)


def _raw_body(rng: random.Random, kind: str) -> bytes:
    if kind == "garbage":
        return rng.randbytes(rng.randint(1, 300))
    if kind == "truncated_json":
        body = orjson.dumps({"op": "infer", "frame_reference": "/dev/shm/" + _rand(rng, 20)})
        return body[:rng.randint(1, len(body) - 1)]
    if kind == "not_utf8":
        return b'{"op": "' + bytes([0xff, 0xfe, rng.getrandbits(7) | 0x80]) + b'"}'
    if kind == "too_deep":
        depth = rng.randint(65, 300)
        return b"[" * depth + b"]" * depth
    raise ValueError(kind)


# kind -> weight. A client draws each message by these weights; the last group ends the
# connection (see Client.run).
MIX = {
    "infer_dir": 8, "infer_raw": 4, "health": 5, "info": 2,
    "garbage": 6, "truncated_json": 4, "not_utf8": 2, "too_deep": 1, "not_object": 3,
    "wrong_types": 10, "missing_field": 4, "unknown_op": 4, "model_mismatch": 4,
    "frame_missing": 10, "frame_forbidden": 6, "frame_not_found_dir": 2, "raw_wrong_size": 3,
    "raw_bad_offset": 3, "raw_bad_format": 2, "frame_invalid": 3, "frame_unsupported": 2,
    "frame_changed": 3,
    # ends the connection
    "zero_length": 0.5, "oversize_length": 0.5, "cut_header": 0.5, "cut_body": 0.5,
    "abandon": 0.5,
}
RAW_KINDS = frozenset(("garbage", "truncated_json", "not_utf8", "too_deep"))
ENDING = ("zero_length", "oversize_length", "cut_header", "cut_body", "abandon")


class Client:
    """One client process's connection and its message stream (seeded per client)."""

    def __init__(self, sock: str, paths: dict[str, str], seed: int, mix: dict[str, float]) -> None:
        self.sock_path = sock
        self.paths = paths
        self.rng = random.Random(seed)
        self.kinds = list(mix)
        self.weights = list(mix.values())
        self.codes: Counter[str] = Counter()
        self.sock: socket.socket | None = None

    def message(self, kind: str) -> bytes:
        body = (_raw_body(self.rng, kind) if kind in RAW_KINDS
                else orjson.dumps(_json(self.rng, self.paths, kind))
                .replace(orjson.dumps(BIG_INT), BIG_INT_JSON))
        return _LENGTH.pack(len(body)) + body

    def batch(self) -> tuple[bytes, int, str | None]:
        """Up to PIPELINE framed messages, how many of them are answered messages, and the
        connection-ending kind that closes the batch (None if none was drawn)."""
        out = bytearray()
        for n in range(PIPELINE):
            kind = self.rng.choices(self.kinds, self.weights)[0]
            if kind in ENDING:
                return bytes(out), n, kind
            out += self.message(kind)
        return bytes(out), PIPELINE, None

    def run(self, budget: int, progress, index: int) -> None:
        sent = 0
        while sent < budget:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(60)
                self.sock.connect(self.sock_path)
            data, answered, ending = self.batch()
            sent += answered + (ending is not None)
            if ending == "abandon":  # the answers of this batch are never read
                self.sock.sendall(data)
                self.close()
            elif ending in ("zero_length", "oversize_length"):
                length = 0 if ending == "zero_length" else self.rng.randint(1 << 25, (1 << 32) - 1)
                self.sock.sendall(data + _LENGTH.pack(length))
                self.read_answers(answered + 1)
                self.codes["closed_after_bad_length" if self.at_eof() else "NOT_CLOSED"] += 1
                self.close()
            else:
                self.sock.sendall(data)
                self.read_answers(answered)
                if ending == "cut_header":
                    self.sock.sendall(b"\x00\x00")
                    self.close()
                elif ending == "cut_body":
                    self.sock.sendall(_LENGTH.pack(200) + b'{"op": "inf')
                    self.close()
            progress[index] = sent
        self.close()

    def read_answers(self, n: int) -> None:
        for _ in range(n):
            body = self.read(_LENGTH.unpack(self.read(4))[0])
            code = orjson.loads(body).get("error_code")
            self.codes[code or "ok"] += 1

    def read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"the server closed the connection after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def at_eof(self) -> bool:
        return self.sock.recv(1) == b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _client_main(sock: str, paths: dict[str, str], seed: int, mix: dict[str, float], budget: int,
                 progress, index: int, results) -> None:
    client = Client(sock, paths, seed, mix)
    try:
        client.run(budget, progress, index)
        results.put((index, dict(client.codes), None))
    except Exception as exc:  # reported by the parent
        results.put((index, dict(client.codes), f"{type(exc).__name__}: {exc}"))


# --- the server's memory -----------------------------------------------------------------------

def sample(pid: int) -> dict[str, float]:
    """VmRSS, smaps_rollup's Rss and Anonymous (MB), open fds and threads of process `pid`."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0]) / (1024 if key == "VmRSS" else 1)
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Rss", "Anonymous"):
                out[key] = int(value.split()[0]) / 1024
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=10_000_000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--every", type=int, default=500_000, help="sample RSS every N messages")
    ap.add_argument("--warmup", type=int, default=1_000_000,
                    help="the RSS at this many messages is the reference")
    ap.add_argument("--tolerance", type=float, default=5.0, help="MB of growth allowed")
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the server (e.g. MALLOC_ARENA_MAX=2)")
    ap.add_argument("--weight", action="append", default=[], metavar="KIND=W",
                    help="change a kind's weight in MIX (0 leaves it out)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for kv in args.weight:
        kind, _, weight = kv.partition("=")
        if kind not in MIX:
            ap.error(f"unknown kind {kind!r} (MIX has {', '.join(MIX)})")
        MIX[kind] = float(weight)
    shm = tempfile.mkdtemp(prefix="vasipc-soakbad-", dir="/dev/shm")
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in args.server_env)
    try:
        model = os.path.join(shm, "tiny.onnx")
        tiny_model(model)
        paths = write_fixtures(shm)
        sock = os.path.join(shm, "soak.sock")
        print(f"# soak_bad_traffic: {machine()}\n# {args.messages} messages, {args.connections} "
              f"connections, pipeline {PIPELINE}, server env {args.server_env or 'default'}\n"
              f"# mix (weights): {MIX}", flush=True)
        with server([*vasipc_cmd(model, sock), "--threads", "1"], sock, env=env) as proc:
            idle = sample(proc.pid)
            rows, codes, failures, elapsed = drive(args, sock, paths, proc.pid)
            time.sleep(1.0)
            end = sample(proc.pid)
        return report(args, idle, rows, end, codes, failures, elapsed)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def drive(args, sock: str, paths: dict[str, str], pid: int):
    ctx = mp.get_context("spawn")
    progress = ctx.Array("q", args.connections, lock=False)
    results = ctx.Queue()
    budget = -(-args.messages // args.connections)
    procs = [ctx.Process(target=_client_main,
                         args=(sock, paths, args.seed * 1000 + k, MIX, budget, progress, k,
                               results))
             for k in range(args.connections)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    rows: list[tuple[int, float, dict]] = []
    mark = args.every
    while any(p.is_alive() for p in procs):
        time.sleep(0.2)
        done = sum(progress)
        if done >= mark:
            rows.append((done, time.perf_counter() - t0, sample(pid)))
            print(f"{done:>10} msgs {rows[-1][1]:7.0f} s  {_fmt(rows[-1][2])}", flush=True)
            mark = (done // args.every + 1) * args.every
    elapsed = time.perf_counter() - t0
    codes: Counter[str] = Counter()
    failures = []
    for _ in procs:
        _, got, failure = results.get(timeout=10)
        codes.update(got)
        if failure:
            failures.append(failure)
    for p in procs:
        p.join()
    return rows, codes, failures, elapsed


def _fmt(s: dict) -> str:
    return (f"VmRSS {s['VmRSS']:.1f} MB (anon {s['Anonymous']:.1f}) fds {s['fds']:.0f} "
            f"threads {s['Threads']:.0f}")


def report(args, idle, rows, end, codes, failures, elapsed) -> int:
    sent = rows[-1][0] if rows else 0
    print("\n| messages | s | VmRSS MB | Anonymous MB | fds | threads |\n|---|---|---|---|---|---|")
    print(f"| idle | 0 | {idle['VmRSS']:.1f} | {idle['Anonymous']:.1f} | {idle['fds']:.0f} | "
          f"{idle['Threads']:.0f} |")
    for n, t, s in rows:
        print(f"| {n} | {t:.0f} | {s['VmRSS']:.1f} | {s['Anonymous']:.1f} | {s['fds']:.0f} | "
              f"{s['Threads']:.0f} |")
    print(f"| end | {elapsed:.0f} | {end['VmRSS']:.1f} | {end['Anonymous']:.1f} | "
          f"{end['fds']:.0f} | {end['Threads']:.0f} |")
    answers = sum(v for k, v in codes.items() if k not in ("closed_after_bad_length", "NOT_CLOSED"))
    print(f"\n{answers} answers by error_code: {dict(codes.most_common())}")
    after = [s["VmRSS"] for n, _, s in rows if n >= args.warmup] + [end["VmRSS"]]
    base = after[0]
    growth = max(after) - base
    print(f"RSS at warm-up ({args.warmup} messages) {base:.1f} MB, max after {max(after):.1f}, "
          f"end {end['VmRSS']:.1f}: +{growth:.1f} MB ({growth * 2**20 / max(sent - args.warmup, 1):.2f}"
          f" bytes/message) vs {args.tolerance} MB allowed; "
          f"{sent / elapsed:.0f} messages/s")
    ok = (growth <= args.tolerance and end["fds"] <= idle["fds"] and not codes.get("internal")
          and not codes.get("NOT_CLOSED") and not failures)
    for failure in failures:
        print(f"client failure: {failure}")
    print("verdict:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
