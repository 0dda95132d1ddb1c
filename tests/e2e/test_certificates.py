"""Certificates with real processes: a PFX and a PEM pair uploaded on the page make a running gateway serve HTTPS
(the openai SDK and a node's wss:// link trust the test's CA), swapped with a stream in flight and nothing
restarted; broken uploads refused while HTTPS keeps the old one; the browser redirect; files the deployment
manages, read again when replaced; and no key or password in any page, answer or log."""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509

from certificates.bundle import fingerprint_of
from tests.certificates.pki import ca_make, cert_pem, key_pem, leaf_make, pfx_of
from tests.conftest import MODEL_ID
from tests.processes import Gateway, NodeAgent, free_port, wait_for

pytestmark = pytest.mark.e2e
PAGE = "/manage/certificates/"
PFX_PASSWORD = "pfx-password-e2e-5831"
WRONG_PASSWORD = "not-the-password-9917"


def _served(port: int, ca_file: Path | None = None) -> str:
    """The SHA-256 of the certificate that 127.0.0.1:`port` presents now ("" if nothing answers TLS there)."""
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else ssl.create_default_context()
    if ca_file is None:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    except OSError:
        return ""
    return fingerprint_of(x509.load_der_x509_certificate(der)) if der else ""


def _upload_pfx(browser: httpx.Client, data: bytes, password: str) -> httpx.Response:
    return browser.post(PAGE, data={"action": "pfx", "pfx_password": password,
                                    "csrfmiddlewaretoken": browser.cookies["csrftoken"]},
                        files={"pfx": ("gateway.pfx", data, "application/x-pkcs12")})


def _upload_pem(browser: httpx.Client, cert: bytes, key: bytes) -> httpx.Response:
    return browser.post(PAGE, data={"action": "pem", "csrfmiddlewaretoken": browser.cookies["csrftoken"]},
                        files={"cert": ("gateway.pem", cert), "key": ("gateway.key", key)})


def _secret_lines(pem: bytes) -> list[str]:
    """The base64 lines of a private key: any one of them found somewhere is a leak."""
    return [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]


def test_an_uploaded_certificate_is_served_over_https_and_swapped_with_nothing_restarted(
        tmp_path: Path, models_dir: Path) -> None:
    ca = ca_make()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(cert_pem(ca[0]))
    first_cert, first_key = leaf_make(ca)
    second_cert, second_key = leaf_make(ca)
    https_port = free_port()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port(), OPTIMAGPT_HTTPS_PORT=str(https_port))
    gateway.data_dir.mkdir()
    gateway.start()
    agent = None
    try:
        pid = gateway.started.pid
        browser = gateway.admin_browser("certadmin", "certadmin-password-1")
        assert "HTTP only" in browser.get(PAGE).text
        assert _served(https_port) == "", "no HTTPS before there is a certificate"

        # A PFX with its chain and password: HTTPS comes up on its own port, HTTP stays.
        response = _upload_pfx(browser, pfx_of(first_cert, first_key, PFX_PASSWORD, chain=(ca[0],)), PFX_PASSWORD)
        assert response.status_code == 302, response.text
        wait_for(lambda: _served(https_port, ca_file) == fingerprint_of(first_cert), 15, "HTTPS with the PFX")
        page = browser.get(PAGE).text
        assert f"HTTPS on port {https_port}" in page and fingerprint_of(first_cert) in page
        assert "Nothing was restarted" in page

        # A node given the test CA links over wss:// and serves; the SDK reaches it over HTTPS.
        https_url = f"https://localhost:{https_port}"
        (tmp_path / "node").mkdir()
        agent = NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=tmp_path / "node", name="tls-node",
                          extra_args=("--gateway-url", https_url, "--ca-file", str(ca_file)))
        agent.start()
        agent.wait_for_model(MODEL_ID)
        assert f"linked to wss://localhost:{https_port}" in agent.log() or "wss://" in agent.log()
        api_key = gateway.create_api_key("tls-client")
        client = openai.OpenAI(base_url=f"{https_url}/v1", api_key=api_key, max_retries=0,
                               http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file))))
        reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4)
        assert reply.usage.completion_tokens == 4
        with pytest.raises(openai.APIConnectionError):  # without the CA, the SDK refuses the certificate
            openai.OpenAI(base_url=f"{https_url}/v1", api_key=api_key, max_retries=0).models.list()

        # A stream in flight over HTTPS while a PEM pair replaces the certificate: it finishes, new handshakes
        # get the new certificate, the node's wss link stays the same link, the gateway is the same process.
        links_before = agent.log().count("linked to ")
        stream = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Count from 1 to 300, one number a line."}],
            max_tokens=250, stream=True, stream_options={"include_usage": True})
        chunks = iter(stream)
        next(chunks)
        swapped = threading.Event()
        after_swap: list[object] = []

        def read_rest() -> None:
            for chunk in chunks:
                if swapped.is_set():
                    after_swap.append(chunk)
            # the last chunk carries the usage

        reader = threading.Thread(target=read_rest)
        reader.start()
        response = _upload_pem(browser, cert_pem(second_cert, ca[0]), key_pem(second_key))
        assert response.status_code == 302, response.text
        wait_for(lambda: _served(https_port, ca_file) == fingerprint_of(second_cert), 15, "the new certificate")
        swapped.set()
        reader.join(60)
        assert not reader.is_alive()
        assert after_swap, "the stream was still running when the certificate changed"
        assert after_swap[-1].usage is not None and after_swap[-1].usage.completion_tokens > 0
        assert gateway.started.pid == pid and gateway.alive
        assert agent.log().count("linked to ") == links_before, "the node's link was not dropped"
        assert client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=1).usage.completion_tokens == 1

        # Broken uploads are refused with their reason; HTTPS keeps serving the second certificate.
        wrong = _upload_pfx(browser, pfx_of(*leaf_make(ca), PFX_PASSWORD), WRONG_PASSWORD)
        assert wrong.status_code == 400 and "password is wrong" in wrong.text
        mismatched = _upload_pem(browser, cert_pem(leaf_make(ca)[0]), key_pem(leaf_make(ca)[1]))
        assert mismatched.status_code == 400 and "does not belong to this certificate" in mismatched.text
        expired_cert, expired_key = leaf_make(ca, days=3, starts_days_ago=4)
        expired = _upload_pfx(browser, pfx_of(expired_cert, expired_key, PFX_PASSWORD), PFX_PASSWORD)
        assert expired.status_code == 400 and "expired on" in expired.text
        assert _served(https_port, ca_file) == fingerprint_of(second_cert)

        # Browsers on HTTP go to HTTPS once switched on; the API and health checks do not move.
        html = {"Accept": "text/html,application/xhtml+xml"}
        with httpx.Client(base_url=gateway.url) as plain:
            assert plain.get("/login/", headers=html).status_code == 200
            switched = browser.post(PAGE, data={"action": "redirect", "redirect": "on",
                                                "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
            assert switched.status_code == 302
            moved = plain.get("/login/?next=/", headers=html)
            assert moved.status_code == 302
            assert moved.headers["location"] == f"https://127.0.0.1:{https_port}/login/?next=/"
            assert plain.get("/v1/models", headers={**html, "Authorization": f"Bearer {api_key}"}).status_code == 200
            assert plain.get("/readyz", headers=html).status_code == 200
            assert plain.get("/healthz", headers=html).status_code == 200
        assert gateway.node_linked("tls-node")

        # Nothing secret anywhere: pages, /readyz, the download, the logs.
        looked_at = "\n".join([browser.get(PAGE).text, browser.get("/manage/settings/").text,
                               browser.get("/manage/nodes/").text, browser.get("/readyz").text,
                               browser.get(PAGE + "certificate.pem").text, gateway.log(), agent.log()])
        for secret in (PFX_PASSWORD, WRONG_PASSWORD, *_secret_lines(key_pem(first_key)),
                       *_secret_lines(key_pem(second_key)), *_secret_lines(key_pem(expired_key))):
            assert secret not in looked_at

        # Removed: the HTTPS port closes, HTTP serves on.
        removed = browser.post(PAGE, data={"action": "remove", "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        assert removed.status_code == 302
        wait_for(lambda: _served(https_port) == "", 10, "the HTTPS listener to close")
        with httpx.Client(base_url=gateway.url) as plain:
            assert plain.get("/login/", headers=html).status_code == 200, "no redirect to a closed port"
    finally:
        if agent is not None:
            agent.stop()
        gateway.stop()


def test_certificate_files_the_deployment_manages_are_served_and_read_again_when_replaced(tmp_path: Path) -> None:
    ca = ca_make()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(cert_pem(ca[0]))
    cert, key = leaf_make(ca, days=20)
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(cert_pem(cert, ca[0]))
    key_file.write_bytes(key_pem(key))
    https_port = free_port()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port(), OPTIMAGPT_HTTPS_PORT=str(https_port),
                      OPTIMAGPT_TLS_CERT_FILE=str(cert_file), OPTIMAGPT_TLS_KEY_FILE=str(key_file),
                      OPTIMAGPT_TLS_CHECK_S="0.5")
    gateway.data_dir.mkdir()
    gateway.start()
    try:
        wait_for(lambda: _served(https_port, ca_file) == fingerprint_of(cert), 15, "HTTPS from the files")
        browser = gateway.admin_browser("filesadmin", "filesadmin-password-1")
        page = browser.get(PAGE).text
        assert "OPTIMAGPT_TLS_CERT_FILE" in page and 'id="upload-pfx"' not in page
        assert "expires in" in page, "20 days left: warned"
        assert "expires in" in browser.get("/readyz").json()["https"]["warning"]
        refused = browser.post(PAGE, data={"action": "generate", "names": "localhost",
                                           "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        assert refused.status_code == 400 and "replace that file instead" in refused.text
        # A renewal replaces both files: served within the check interval, with no restart.
        renewed, renewed_key = leaf_make(ca, days=90)
        key_file.write_bytes(key_pem(renewed_key))
        cert_file.write_bytes(cert_pem(renewed, ca[0]))
        wait_for(lambda: _served(https_port, ca_file) == fingerprint_of(renewed), 15, "the renewed certificate")
        assert "warning" not in browser.get("/readyz").json()["https"]
        for secret in (*_secret_lines(key_pem(key)), *_secret_lines(key_pem(renewed_key))):
            assert secret not in gateway.log()
    finally:
        gateway.stop()


def test_the_https_flags_of_the_server_take_certificate_files_and_a_port(tmp_path: Path) -> None:
    cert, key = leaf_make(ca_make())
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(cert_pem(cert))
    key_file.write_bytes(key_pem(key))
    https_port = free_port()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port())
    gateway.data_dir.mkdir()
    gateway.manage("migrate", "--verbosity", "0")
    gateway._spawn([sys.executable, "-m", "optimagpt.server",
                    "-b", "127.0.0.1", "-p", str(gateway.port), "--tls-cert", str(cert_file),
                    f"--tls-key={key_file}", "--https-port", str(https_port)], gateway.env)
    try:
        wait_for(lambda: _served(https_port) == fingerprint_of(cert), 30, "HTTPS from --tls-cert/--tls-key")
        with httpx.Client(base_url=gateway.url) as plain:
            assert plain.get("/healthz").status_code == 200, "HTTP beside it"
    finally:
        gateway.stop()


def _spki_pin(cert: x509.Certificate) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes: base64 of the SHA-256 of the public key."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization

    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def test_the_certificates_page_in_chromium_makes_uploads_and_redirects_under_its_csp(
        browser, tmp_path: Path) -> None:
    """A person's path in headless Chromium: log in, make a self-signed certificate, upload a PFX from a CA the
    gateway's system trusts (SSL_CERT_FILE: the test's CA); then a browser that trusts the certificate sees it
    trusted over HTTPS, switches the redirect on, and a page opened over HTTP lands on HTTPS; no CSP refusal or
    script error (the service worker registers only over a certificate the browser trusts). Screenshot in
    test-artifacts/."""
    from tests.conftest import ARTIFACTS, BROWSER_FLAGS

    ca = ca_make("Example Org Root CA")
    store = tmp_path / "trusted.pem"
    store.write_bytes(cert_pem(ca[0]))
    cert, key = leaf_make(ca, names=("localhost", "127.0.0.1", "gateway.example.org"), days=365)
    pfx = tmp_path / "gateway.pfx"
    pfx.write_bytes(pfx_of(cert, key, PFX_PASSWORD, chain=(ca[0],)))
    https_port = free_port()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port(), OPTIMAGPT_HTTPS_PORT=str(https_port),
                      SSL_CERT_FILE=str(store))
    gateway.data_dir.mkdir()
    gateway.start()
    problems: list[str] = []

    def watched(page: object) -> None:
        page.set_default_timeout(30_000)
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))

    def log_in(page: object, url: str) -> None:
        page.goto(url + "/login/")
        page.fill("input[name=username]", "pageadmin")
        page.fill("input[name=password]", "pageadmin-password-1")
        page.click("button[type=submit]")

    trusting = None
    try:
        gateway.admin_browser("pageadmin", "pageadmin-password-1").close()
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        watched(page)
        log_in(page, gateway.url)
        page.wait_for_url(gateway.url + "/")
        page.click("header >> text=Certificates")
        page.wait_for_url(gateway.url + PAGE)
        assert page.text_content("[data-field=https]").strip() == "HTTP only"
        page.fill("#id_names", "localhost, 127.0.0.1")
        page.click("#generate button[type=submit]")
        page.wait_for_selector(".messages >> text=Nothing was restarted")
        assert "self-signed" in page.text_content("[data-field=trust-reason]")
        page.set_input_files("#id_pfx", str(pfx))
        page.fill("#id_pfx_password", PFX_PASSWORD)
        page.click("#upload-pfx button[type=submit]")
        page.wait_for_selector(".messages >> text=Nothing was restarted")
        assert page.text_content("[data-field=trust]").strip() == "Certificate trusted"
        wait_for(lambda: _served(https_port) == fingerprint_of(cert), 15, "the uploaded certificate")

        # A browser that trusts the certificate (pinned by its key): over HTTPS, it switches the redirect on.
        trusting = browser.browser_type.launch(executable_path=browser_path(),
                                               args=[*BROWSER_FLAGS, f"--ignore-certificate-errors-spki-list="
                                                                     f"{_spki_pin(cert)}"])
        secure = trusting.new_page(viewport={"width": 1280, "height": 1000})
        watched(secure)
        https = f"https://127.0.0.1:{https_port}"
        log_in(secure, https)
        secure.wait_for_url(https + "/")
        secure.goto(https + PAGE)
        secure.check("#redirect input[name=redirect]")
        secure.click("#redirect button[type=submit]")
        secure.wait_for_selector(".messages >> text=now sent to HTTPS")
        assert secure.text_content("[data-field=https]").strip() == "HTTPS"
        assert secure.text_content("[data-field=trust]").strip() == "Certificate trusted"
        assert "CN=Example Org Root CA" in secure.text_content("[data-field=issuer]")
        assert secure.text_content("[data-field=fingerprint]").strip() == fingerprint_of(cert)
        secure.wait_for_function("navigator.serviceWorker.controller !== null || "
                                 "navigator.serviceWorker.getRegistrations().then(r => r.length > 0)")
        secure.screenshot(path=str(ARTIFACTS / "certificates.png"), full_page=True)
        content = secure.content() + page.content()
        secure.goto(gateway.url + "/manage/nodes/")  # a page over HTTP: the browser lands on HTTPS
        assert secure.url == https + "/manage/nodes/"
        assert PFX_PASSWORD not in content and _secret_lines(key_pem(key))[1] not in content
    finally:
        if trusting is not None:
            trusting.close()
        gateway.stop()
    assert not problems, problems
    assert PFX_PASSWORD not in gateway.log()


def browser_path() -> str:
    import shutil

    found = shutil.which("chromium")
    assert found is not None
    return found
