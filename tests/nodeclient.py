"""Python side of the node-opcua test client (tests/opcua_node/client.mjs).

The test suite talks to OPC UA servers with a stack that is not asyncua (the line server's own stack), so
that a misreading of the spec shared by our server and our client cannot pass unnoticed. The client is a
Node.js program: `make test` installs its pinned packages (`npm ci` in tests/opcua_node).

A script is a dict, sent as JSON on the client's stdin::

    {
      "endpoint": "opc.tcp://127.0.0.1:4840/sorter",
      "securityMode": "SignAndEncrypt",          # "None" | "Sign" | "SignAndEncrypt"
      "securityPolicy": "Basic256Sha256",        # "None" | "Basic256Sha256" | ...
      "certificate": "/tmp/x/client.der",        # client certificate, DER (or PEM); omitted: node-opcua makes one
      "privateKey": "/tmp/x/client_key.pem",     # its key, PEM (PKCS#8 or PKCS#1, unencrypted)
      "applicationUri": "urn:...",               # MUST equal the certificate's URI subjectAltName (filled in
                                                 #   from the certificate by run_node_client when omitted)
      "userName": "operator", "password": "...", # omitted: anonymous
      "namespace": "urn:magnet-sorter:line",     # plain path names are looked up in this namespace
      "acceptServerCertificate": true,           # trust an unknown server certificate (default true)
      "trustServerCertificate": "/path/srv.der", # or trust exactly this one (with acceptServerCertificate false)
      "maxRetry": 1, "connectTimeout": 10,       # connection attempts / transport timeout (s)
      "timeout": 55,                             # whole-script watchdog (s); run_node_client sets it
      "steps": [ ... ]
    }

Steps (each gives one entry in "results", in order; every entry has "op", "ok" and "stepSeconds"; a
failed step has "error" (a status code name when there is one) and "message"). A path is a list of
browse names from the Objects folder; "N:Name" names a node in namespace index N (e.g. "0:Server")::

    {"op": "browse", "path": ["SortingLine"]}        -> "children": [names in the namespace], "references": [...]
    {"op": "read", "path": ["SortingLine", "State"]} -> "value", "dataType", "statusCode", "sourceTimestamp"
    {"op": "write", "path": [...], "value": 3, "type": "Int32"}  -> "statusCode" (type optional)
    {"op": "call", "path": ["SortingLine"], "method": "Start", "args": []}
                                                     -> "statusCode", "outputArguments", "callSeconds"
       args are plain JSON values converted to the method's InputArguments types, or {"type": "UInt16", "value": 3}
    {"op": "subscribe", "path": [...], "seconds": 5, "until": n, "background": false}  # until: stop after n values
                                                     -> "values": [{"value", "statusCode", "sourceTimestamp", "t"}]
    {"op": "events", "path": ["SortingLine"], "seconds": 3, "background": false}
                                                     -> "events": [{"Message", "Severity", "EventType", "SourceName",
                                                                    "Time", "t"}]
    {"op": "wait_value", "path": [...], "equals": "Execute", "timeout": 10}
                                                     -> "ok", "timedOut", "seconds", "value", "values"
    {"op": "sleep", "seconds": 1}

"background": true starts a subscription/event monitor and goes on with the next steps at once; its entry
is filled in at the end of the script (after its "seconds" have passed). "t" is seconds since the step
started. Int64/UInt64 values come back as JSON numbers, LocalizedText as its text, NodeIds as strings.

The answer: {"connected": bool, "error"?: str, "message"?: str, "securityMode", "securityPolicy",
"namespaceIndex", "results": [...], "elapsed": s}. A connection that fails (wrong password, rejected
certificate, security mode not offered, nothing listening) is {"connected": false, "error":
"BadUserAccessDenied" | "BadIdentityTokenRejected" | "BadSecurityChecksFailed" | <message>}.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CLIENT_DIR = Path(__file__).resolve().parent / "opcua_node"
CLIENT_SCRIPT = CLIENT_DIR / "client.mjs"
INSTALL_HINT = "run `make test` (it runs `npm ci` in tests/opcua_node) to install the node-opcua test client"


class NodeClientError(RuntimeError):
    """The node client could not be run or gave no JSON answer; str() has its stderr tail."""


def node_problem() -> str | None:
    """Why the node client cannot run here (None when it can)."""
    if shutil.which("node") is None:
        return f"Node.js (`node`) is not on PATH; install Node.js >= 20, then {INSTALL_HINT}"
    if not (CLIENT_DIR / "node_modules" / "node-opcua-client").is_dir():
        return f"{CLIENT_DIR / 'node_modules'} is missing: {INSTALL_HINT}"
    return None


def node_available() -> bool:
    return node_problem() is None


def require_node() -> None:
    """For tests: fail in CI (a missing client must not turn into silent skips), skip locally."""
    from tests.conftest import skip_or_fail_in_ci

    problem = node_problem()
    if problem is not None:
        skip_or_fail_in_ci(f"node-opcua test client unavailable: {problem}")


def _command() -> list[str]:
    node = shutil.which("node")
    if node is None:
        raise NodeClientError(node_problem() or "node not found")
    return [node, str(CLIENT_SCRIPT)]


def certificate_application_uri(cert_file: str | Path) -> str | None:
    """The URI subjectAltName of a DER or PEM certificate (what the client's applicationUri must be)."""
    from cryptography import x509

    data = Path(cert_file).read_bytes()
    cert = (
        x509.load_pem_x509_certificate(data)
        if data.lstrip().startswith(b"-----")
        else x509.load_der_x509_certificate(data)
    )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _prepare(script: dict[str, Any], timeout: float) -> bytes:
    script = dict(script)
    if script.get("certificate") and not script.get("applicationUri"):
        # node-opcua would otherwise send urn:<host>:<applicationName>, which the certificate does not carry
        script["applicationUri"] = certificate_application_uri(script["certificate"])
    # the client's own watchdog fires first, so a hung step still yields a JSON answer with the results so far
    script.setdefault("timeout", max(1.0, timeout - 3.0))
    return json.dumps(script).encode()


def _parse(stdout: bytes, stderr: bytes, returncode: int | None) -> dict[str, Any]:
    text = stdout.decode(errors="replace").strip()
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            result["stderr"] = stderr.decode(errors="replace")[-4000:]
            return result
    tail = stderr.decode(errors="replace")[-4000:]
    raise NodeClientError(
        f"node client gave no JSON answer (exit {returncode}); stdout={text[-2000:]!r}\nstderr:\n{tail}"
    )


def run_node_client(script: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """Run the script through the node-opcua client; its JSON answer (plus "stderr", the log tail)."""
    try:
        proc = subprocess.run(
            _command(), input=_prepare(script, timeout), capture_output=True, timeout=timeout, cwd=CLIENT_DIR
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"").decode(errors="replace")[-4000:]
        raise NodeClientError(f"node client still running after {timeout} s; stderr:\n{tail}") from exc
    return _parse(proc.stdout, proc.stderr, proc.returncode)


async def arun_node_client(script: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """As run_node_client, without blocking the event loop (so a server in the same loop keeps serving)."""
    data = _prepare(script, timeout)
    proc = await asyncio.create_subprocess_exec(
        *_command(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=CLIENT_DIR,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(data), timeout)
    except TimeoutError as exc:
        raise NodeClientError(f"node client still running after {timeout} s (killed)") from exc
    finally:
        if proc.returncode is None:  # timed out, or the calling test was cancelled: no stray node process
            proc.kill()
            await proc.wait()
    return _parse(stdout, stderr, proc.returncode)


def step(result: dict[str, Any], index: int) -> dict[str, Any]:
    """results[index], with the whole answer in the message when the client never got that far."""
    results = result.get("results", [])
    assert result.get("connected"), f"node client did not connect: {result.get('error')} {result.get('message', '')}"
    assert index < len(results), f"no result {index}: {json.dumps(result)[:3000]}"
    return results[index]


def make_certificate(
    cert_path: str | Path,
    key_path: str | Path,
    *,
    application_uri: str,
    hostnames: Iterable[str] = ("localhost", "127.0.0.1"),
    common_name: str = "magnet-sorter test",
    days: int = 30,
) -> tuple[Path, Path]:
    """An OPC UA application certificate (DER) and key (PEM), made the way `sorter opcua certs` makes them.

    node-opcua compares the certificate's URI subjectAltName with the client's applicationUri.
    """
    from sorter.north.opcua.pki import make_certificate as make

    cert_path, key_path = Path(cert_path), Path(key_path)
    make(
        cert_path,
        key_path,
        common_name=common_name,
        application_uri=application_uri,
        hostnames=list(hostnames),
        days=days,
        overwrite=True,
    )
    return cert_path, key_path
