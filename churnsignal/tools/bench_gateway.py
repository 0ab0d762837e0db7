"""`churnsignal bench --gateway`: the HTTP ingest gateway against a bare forwarder (the ceiling).

On one broker, each in its own process on loopback:

- the gateway: a real ``churnsignal gateway`` (write key checked, every message normalised and
  validated by the worker's decoder, keyed, sent with ``acks=all`` and awaited);
- the ceiling: a bare HTTP-to-aiokafka forwarder in a few lines (``forwarder`` below: parse the
  JSON, send each message with ``acks=all``, await the acknowledgements, answer 200);
- the load: an aiohttp client (``load`` below), in its own process.

For each server, in the same run: events/s through ``/v1/batch`` (100-message batches, closed
loop), single-call requests/s on ``/v1/track``, then p50/p99 latency of both at half the
maximum (open loop, latency counted from each request's scheduled time, so a stall is not
hidden), the server process's CPU seconds (psutil) and its RSS at the start, peak and end.
Results go to ``OUT/gateway.json``.

``python -m churnsignal.tools.bench_gateway forwarder BOOTSTRAP PORT TOPIC`` and
``python -m churnsignal.tools.bench_gateway load URL MODE SECONDS CONCURRENCY RATE WRITE_KEY``
are the two helper processes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

BATCH = 100  # messages per /v1/batch request
PHASE_S_ENV = "_CHURNSIGNAL_BENCH_PHASE_S"  # shorter phases for the command's own test
PHASE_S = float(os.environ.get(PHASE_S_ENV) or 10.0)
WARMUP_S = min(3.0, PHASE_S)
BATCH_CONCURRENCY = 16
TRACK_CONCURRENCY = 32
TARGETS = {"events_per_cpu_s": 20_000, "p99_s": 0.050, "vs_forwarder": 0.5}


# -- the ceiling: a bare forwarder ----------------------------------------------------------

async def forwarder(bootstrap: str, port: int, topic: str) -> None:
    """HTTP in, aiokafka out (acks=all, every send awaited), nothing else."""
    from aiohttp import web
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2,
                                max_request_size=1 << 20)
    await producer.start()
    ok = b'{"success":true}'

    async def send(messages: list[Any]) -> web.Response:
        futures = [await producer.send(topic, orjson.dumps(m)) for m in messages]
        await asyncio.gather(*futures)
        return web.Response(body=ok, content_type="application/json")

    async def batch(request: web.Request) -> web.Response:
        return await send(orjson.loads(await request.read())["batch"])

    async def track(request: web.Request) -> web.Response:
        return await send([orjson.loads(await request.read())])

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/v1/batch", batch)
    app.router.add_post("/v1/track", track)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until SIGTERM


# -- the load -------------------------------------------------------------------------------

def _bodies(mode: str, n: int) -> list[bytes]:
    """Pre-built request bodies (the load generator spends its CPU on HTTP, not JSON)."""
    from churnsignal.tools.synthetic import FEATURES, segment_track

    now = time.time()
    sent_at = b',"sentAt":"' + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)).encode()
    out = []
    for b in range(n):
        messages = [segment_track(f"acct-{(b * BATCH + i) % 5000:05d}", f"u{i}",
                                  f"{FEATURES[i % len(FEATURES)].title()} Viewed", now - i,
                                  f"bench-{uuid.uuid4().hex}", FEATURES[i % len(FEATURES)])
                    for i in range(BATCH if mode == "batch" else 1)]
        if mode == "batch":
            out.append(b'{"batch":[' + b",".join(messages) + b"]" + sent_at + b'"}')
        else:
            out.append(messages[0])
    return out


async def load(url: str, mode: str, seconds: float, concurrency: int, rate: float,
               write_key: str) -> dict[str, Any]:
    """Closed loop (``rate`` 0: ``concurrency`` requests always in flight) or open loop
    (``rate`` requests/s on a fixed schedule, at most ``concurrency`` in flight)."""
    import aiohttp

    bodies = _bodies(mode, 64)
    per_request = BATCH if mode == "batch" else 1
    path = "/v1/batch" if mode == "batch" else "/v1/track"
    headers = {"Content-Type": "application/json",
               "Authorization": "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    ok = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(i: int, scheduled: float) -> None:
            nonlocal ok
            try:
                async with session.post(path, data=bodies[i % len(bodies)],
                                        headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = -1
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            if status == 200:
                ok += 1
                latencies.append(time.perf_counter() - scheduled)
            elif status != -1:
                errors[str(status)] = errors.get(str(status), 0) + 1

        started = time.perf_counter()
        end = started + seconds
        if rate <= 0:
            async def worker(w: int) -> None:
                i = w
                while time.perf_counter() < end:
                    await one(i, time.perf_counter())
                    i += concurrency

            await asyncio.gather(*(worker(w) for w in range(concurrency)))
        else:
            slots = asyncio.Semaphore(concurrency)
            tasks = set()
            i = 0
            while True:
                scheduled = started + i / rate
                if scheduled >= end:
                    break
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()

                async def run(i: int = i, scheduled: float = scheduled) -> None:
                    try:
                        await one(i, scheduled)
                    finally:
                        slots.release()

                task = asyncio.create_task(run())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"mode": mode, "requests_ok": ok, "events_ok": ok * per_request,
            "seconds": elapsed, "requests_per_s": ok / elapsed,
            "events_per_s": ok * per_request / elapsed, "errors": errors,
            "p50_s": _pct(latencies, 0.50), "p99_s": _pct(latencies, 0.99),
            "max_s": latencies[-1] if latencies else float("nan"), "rate": rate}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


# -- the run --------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    rss: list[float] = field(default_factory=list)  # MB, sampled
    results: dict[str, Any] = field(default_factory=dict)


def _run_load(server: Server, mode: str, seconds: float, concurrency: int, rate: float,
              write_key: str) -> dict[str, Any]:
    import psutil

    process = psutil.Process(server.proc.pid)
    cpu = process.cpu_times()
    proc = subprocess.run([sys.executable, "-m", "churnsignal.tools.bench_gateway", "load",
                           server.url, mode, str(seconds), str(concurrency), str(rate),
                           write_key], capture_output=True, text=True, timeout=seconds + 120)
    after = process.cpu_times()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"load against {server.name} failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["server_cpu_s"] = (after.user - cpu.user) + (after.system - cpu.system)
    result["events_per_server_cpu_s"] = result["events_ok"] / max(1e-9, result["server_cpu_s"])
    return result


def _sample_rss(servers: list[Server], stop: threading.Event) -> None:
    import psutil

    processes = [(s, psutil.Process(s.proc.pid)) for s in servers]
    while not stop.wait(0.5):
        for server, process in processes:
            try:
                server.rss.append(process.memory_info().rss / 2**20)
            except psutil.Error:
                pass


def run_gateway_bench(settings: Any, bootstrap: str, out_dir: Path,
                      phase_s: float = PHASE_S) -> dict[str, Any]:
    """Both servers, every phase, one run; prints the table and writes gateway.json."""
    import psutil
    from rich.console import Console
    from rich.table import Table

    from churnsignal.app.embedded import PARENT_PID_ENV, free_port, wait_for_port
    from churnsignal.tools.demo import demo_credentials, start_gateway, stop_process, wait_ready

    console = Console()
    prefix = f"benchgw{uuid.uuid4().hex[:6]}"
    topics = {"CHURNSIGNAL_TOPICS__USAGE": f"{prefix}.usage",
              "CHURNSIGNAL_TOPICS__BILLING": f"{prefix}.billing",
              "CHURNSIGNAL_TOPICS__SUPPORT": f"{prefix}.support",
              "CHURNSIGNAL_TOPICS__DLQ": f"{prefix}.dlq"}
    work = Path(tempfile.mkdtemp(prefix="churnsignal-bench-gateway-"))
    credentials = demo_credentials()
    servers: list[Server] = []
    stop = threading.Event()
    try:
        port = free_port()
        gateway = start_gateway(bootstrap, work, port, credentials, extra_env={
            **topics, "CHURNSIGNAL_LOG_LEVEL": "warning"})
        servers.append(Server("gateway", f"http://127.0.0.1:{port}", gateway))
        if not wait_ready(port, gateway, 90):  # the gateway creates its topics
            raise RuntimeError(f"the gateway did not get ready; see {work / 'gateway.log'}")
        fport = free_port()
        log = (work / "forwarder.log").open("ab")
        forward = subprocess.Popen(
            [sys.executable, "-m", "churnsignal.tools.bench_gateway", "forwarder", bootstrap,
             str(fport), topics["CHURNSIGNAL_TOPICS__USAGE"]], stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, PARENT_PID_ENV: str(os.getpid())})
        servers.insert(0, Server("forwarder", f"http://127.0.0.1:{fport}", forward))
        if not wait_for_port(fport, 60):
            raise RuntimeError(f"the forwarder did not start; see {work / 'forwarder.log'}")
        key = credentials.write_key
        console.print(f"gateway {servers[1].url} and bare forwarder {servers[0].url} on "
                      f"{bootstrap}; {phase_s:g} s per phase")
        for s in servers:
            _run_load(s, "batch", WARMUP_S, BATCH_CONCURRENCY, 0, key)
            s.rss.append(psutil.Process(s.proc.pid).memory_info().rss / 2**20)
            s.results["rss_start_mb"] = s.rss[-1]
        sampler = threading.Thread(target=_sample_rss, args=(servers, stop), daemon=True)
        sampler.start()
        # Each phase on both servers back to back, so the machine's drift hits both alike.
        for mode, concurrency in (("batch", BATCH_CONCURRENCY), ("track", TRACK_CONCURRENCY)):
            for s in servers:
                r = _run_load(s, mode, phase_s, concurrency, 0, key)
                s.results[f"{mode}_max"] = r
                console.print(f"{s.name:<10} {mode} max: {r['events_per_s']:>9,.0f} events/s, "
                              f"{r['requests_per_s']:>7,.0f} requests/s, "
                              f"{r['events_per_server_cpu_s']:>8,.0f} events per CPU-second "
                              f"of the server, errors {r['errors']}")
        for mode, concurrency in (("batch", 256), ("track", 256)):
            for s in servers:
                rate = s.results[f"{mode}_max"]["requests_per_s"] / 2
                r = _run_load(s, mode, phase_s, concurrency, rate, key)
                s.results[f"{mode}_half"] = r
                console.print(f"{s.name:<10} {mode} at {rate:,.0f} requests/s (half the max): "
                              f"p50 {r['p50_s'] * 1000:.1f} ms, p99 {r['p99_s'] * 1000:.1f} ms, "
                              f"errors {r['errors']}")
        stop.set()
        sampler.join(5)
        for s in servers:
            s.results["rss_end_mb"] = psutil.Process(s.proc.pid).memory_info().rss / 2**20
            s.results["rss_peak_mb"] = max(s.rss)
    finally:
        stop.set()
        for s in servers:
            stop_process(s.proc)
    fw, gw = servers[0].results, servers[1].results
    results = {
        "forwarder": fw, "gateway": gw,
        "gateway_vs_forwarder_batch": gw["batch_max"]["events_per_s"]
        / fw["batch_max"]["events_per_s"],
        "gateway_vs_forwarder_track": gw["track_max"]["requests_per_s"]
        / fw["track_max"]["requests_per_s"],
        "targets": TARGETS, "batch_size": BATCH, "phase_s": phase_s,
        "broker": "embedded Tansu" if settings.embedded_broker else bootstrap,
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "load_avg_at_end": os.getloadavg()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gateway.json").write_text(json.dumps(results, indent=2) + "\n")
    table = Table(title=f"churnsignal bench --gateway ({BATCH}-message batches, {phase_s:g} s "
                        "per phase, one run)")
    table.add_column("")
    table.add_column("bare forwarder (ceiling)", justify="right")
    table.add_column("gateway", justify="right")
    table.add_column("gateway / ceiling", justify="right")

    def row(label: str, f: float, g: float, fmt: str = "{:,.0f}", ratio: bool = True) -> None:
        table.add_row(label, fmt.format(f), fmt.format(g), f"{g / f:.2f}x" if ratio else "")

    row("/v1/batch events/s", fw["batch_max"]["events_per_s"], gw["batch_max"]["events_per_s"])
    row("  events per CPU-second of the server", fw["batch_max"]["events_per_server_cpu_s"],
        gw["batch_max"]["events_per_server_cpu_s"])
    row("/v1/track requests/s", fw["track_max"]["requests_per_s"],
        gw["track_max"]["requests_per_s"])
    for mode in ("batch", "track"):
        for q in ("p50_s", "p99_s"):
            row(f"{mode} {q[:3]} at half the max (ms)", fw[f"{mode}_half"][q] * 1000,
                gw[f"{mode}_half"][q] * 1000, "{:.1f}", ratio=False)
    for k in ("rss_start_mb", "rss_peak_mb", "rss_end_mb"):
        row(f"RSS {k.split('_')[1]} (MB)", fw[k], gw[k], "{:.0f}", ratio=False)
    console.print(table)
    checks = [
        ("events per CPU-second of the gateway (batches)",
         gw["batch_max"]["events_per_server_cpu_s"], ">=", TARGETS["events_per_cpu_s"]),
        ("p99 at half the max, batch (s)", gw["batch_half"]["p99_s"], "<", TARGETS["p99_s"]),
        ("p99 at half the max, track (s)", gw["track_half"]["p99_s"], "<", TARGETS["p99_s"]),
        ("gateway / forwarder, batch events/s", results["gateway_vs_forwarder_batch"], ">=",
         TARGETS["vs_forwarder"]),
    ]
    for label, value, op, target in checks:
        met = value >= target if op == ">=" else value < target
        console.print(f"target {label} {op} {target:g}: {value:,.3f} "
                      f"{'met' if met else 'NOT met'}")
    console.print(f"written: {out_dir / 'gateway.json'}")
    return results


def main(argv: list[str]) -> None:
    if argv[0] == "forwarder":
        from churnsignal.app.embedded import follow_parent

        follow_parent()  # a killed bench takes its forwarder with it
        asyncio.run(forwarder(argv[1], int(argv[2]), argv[3]))
    elif argv[0] == "load":
        url, mode, seconds, concurrency, rate, key = argv[1:7]
        result = asyncio.run(load(url, mode, float(seconds), int(concurrency), float(rate), key))
        print(json.dumps(result), flush=True)
    else:
        raise SystemExit(f"unknown: {argv[0]} (forwarder | load)")


if __name__ == "__main__":
    main(sys.argv[1:])
