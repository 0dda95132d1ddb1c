"""What HTTPS costs the gateway, and how soon an applied certificate is served: one gateway process, one run.

    .venv/bin/python bench/https.py [--seconds 5] [--rounds 5]

Figures, rounds interleaved between HTTP and HTTPS so a drift in the machine's speed hits both alike:
  requests/s   GET /healthz on one kept-alive connection (the per-request cost of TLS: encryption only)
  new conn ms  a new connection's first GET /healthz, handshake included (p50, p90)
  apply ms     from the page's answer to a new certificate (302) to the first handshake that gets it
               (p50 over the rounds; nothing restarts)
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.certificates.pki import ca_make, cert_pem, key_pem, leaf_make  # noqa: E402
from tests.processes import Gateway, free_port  # noqa: E402


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def rate(client: httpx.Client, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        client.get("/healthz").raise_for_status()
        done += 1
    return done / (time.perf_counter() - start)


def new_connection_ms(url: str, verify: ssl.SSLContext | bool, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        with httpx.Client(base_url=url, verify=verify) as client:
            client.get("/healthz").raise_for_status()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def served_der(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.getpeercert(binary_form=True) or b""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per requests/s sample")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from cryptography.hazmat.primitives import serialization

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ca = ca_make()
        (root / "ca.pem").write_bytes(cert_pem(ca[0]))
        verify = ssl.create_default_context(cafile=str(root / "ca.pem"))
        https_port = free_port()
        (root / "gw").mkdir()
        gateway = Gateway(data_dir=root / "gw", port=free_port(), OPTIMAGPT_HTTPS_PORT=str(https_port))
        gateway.start()
        try:
            browser = gateway.admin_browser("bench", "bench-password-123456")
            results: dict[str, dict[str, list[float]]] = {"HTTP": {"rps": [], "conn": []},
                                                          "HTTPS": {"rps": [], "conn": []}}
            apply_ms: list[float] = []
            https_url = f"https://localhost:{https_port}"
            for r in range(args.rounds):
                cert, key = leaf_make(ca)
                start = time.perf_counter()
                answer = browser.post("/manage/certificates/", data={
                    "action": "pem", "csrfmiddlewaretoken": browser.cookies["csrftoken"]},
                    files={"cert": ("c.pem", cert_pem(cert)), "key": ("k.pem", key_pem(key))})
                assert answer.status_code == 302, answer.text
                answered = time.perf_counter()
                wanted = cert.public_bytes(serialization.Encoding.DER)
                while True:
                    try:
                        if served_der(https_port) == wanted:
                            break
                    except OSError:
                        pass
                    assert time.perf_counter() - start < 30, "the certificate was not served"
                    time.sleep(0.001)
                apply_ms.append((time.perf_counter() - answered) * 1000)
                # One SSL context made beforehand for both: httpx would otherwise load the CA bundle for every
                # new client, http:// too (about 20 ms), and that would be measured as the connection's cost.
                for name, url, v in (("HTTP", gateway.url, verify), ("HTTPS", https_url, verify)):
                    with httpx.Client(base_url=url, verify=v) as client:
                        client.get("/healthz")
                        results[name]["rps"].append(rate(client, args.seconds))
                    results[name]["conn"] += new_connection_ms(url, v, 50)
                http_rps, https_rps = results["HTTP"]["rps"][-1], results["HTTPS"]["rps"][-1]
                print(f"round {r + 1}: HTTP {http_rps:.0f}/s, HTTPS {https_rps:.0f}/s, "
                      f"applied in {apply_ms[-1]:.1f} ms",
                      flush=True)
        finally:
            gateway.stop()
    print("| scheme | req/s, one connection (median) | new connection p50 ms | p90 ms |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {statistics.median(r['rps']):.0f} | {pct(r['conn'], 0.5):.2f} | {pct(r['conn'], 0.9):.2f} |")
    ratio = statistics.median(h / p for h, p in zip(results["HTTPS"]["rps"], results["HTTP"]["rps"], strict=True))
    print(f"\nHTTPS requests/s {100 * ratio:.1f}% of HTTP's (median of per-round ratios); a certificate applied on the "
          f"page is served {statistics.median(apply_ms):.1f} ms after the page answers (median, max "
          f"{max(apply_ms):.1f} ms), with no restart")


if __name__ == "__main__":
    main()
