"""`flowrun homewizard-pair HOST`: get an API v2 token from a HomeWizard P1 meter.

HW-DOC docs/v2/authorization.mdx (reference/devices.md §1.4): `POST /api/user
{"name": "local/<name>"}` answers 403 user:creation-not-enabled until the button on the
meter is pressed; for 30 s after the press the next POST returns the token. So we POST
about once a second until it comes or the time is up, then write it to a 0600 file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import ssl
import sys
import time
from pathlib import Path

from nodes._homewizard import (
    DeviceError,
    P1Target,
    TlsRejected,
    cert_name,
    error_code,
    read_ca,
    request_json,
    tls_context,
)
from nodes._http import HttpClient

NAME = re.compile(r"^local/[a-zA-Z0-9\-_/\\# ]{1,40}$")  # HW-DOC authorization.mdx
RETRY_S = 1.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowrun homewizard-pair",
        description=(
            "Pair with a HomeWizard P1 meter's API v2: press the button on the meter when "
            "asked; the token is written to --token-file (mode 0600) for http_poll's "
            "token_file."
        ),
    )
    p.add_argument("host", help="the meter's address (IP or name)")
    p.add_argument(
        "--name", default="local/flowrun", help="user name on the device (default local/flowrun)"
    )
    p.add_argument(
        "--token-file", help="where to write the token (default ./homewizard-HOST.token)"
    )
    p.add_argument("--ca-file", help="PEM CA to trust instead of the HomeWizard CA (simulator)")
    p.add_argument("--serial", help="check the certificate name appliance/p1dongle/SERIAL")
    p.add_argument("--port", type=int, help="HTTPS port if not 443 (simulator)")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the button (30)"
    )
    return p


def write_token(path: Path, token: str) -> None:
    """Atomically, readable by the owner only: a half-written or world-readable token file
    must never exist, not even for a moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def pair(args: argparse.Namespace, out: list[str]) -> str | None:
    """The token, or None (why is in `out`)."""
    target = P1Target(host=args.host, api="v2", path="/api/user", port=args.port)
    pem = read_ca(args.ca_file)
    tls = tls_context(pem, check_name=args.serial is not None)
    name = cert_name(args.serial) if args.serial else None
    deadline = time.monotonic() + args.timeout
    asked = False
    last = ""
    async with HttpClient() as client:
        while True:
            try:
                reply = await request_json(
                    client,
                    "POST",
                    target.base_url() + "/api/user",
                    timeout_s=min(5.0, max(0.5, deadline - time.monotonic())),
                    json_body={"name": args.name},
                    ssl_ctx=tls,
                    server_hostname=name,
                )
            except TlsRejected as exc:
                ca = f"the CA in {args.ca_file}" if args.ca_file else "the HomeWizard CA"
                out.append(f"{args.host}: {exc} (expected a certificate signed by {ca})")
                return None
            except DeviceError as exc:  # not up yet, or a glitch: keep trying until the deadline
                last = f"{args.host}: {exc}"
            else:
                code = error_code(reply.body)
                token = reply.body.get("token") if isinstance(reply.body, dict) else None
                if reply.status == 200 and isinstance(token, str) and token:
                    return token
                if reply.status == 403 and code == "user:creation-not-enabled":
                    if not asked:
                        print(
                            f"Press the button on the P1 meter at {args.host} now "
                            f"(waiting up to {args.timeout:g} s)...",
                            flush=True,
                        )
                        asked = True
                    last = "the button was not pressed in time"
                else:
                    out.append(f"{args.host}: pairing refused: HTTP {reply.status} {code or ''}")
                    return None
            left = deadline - time.monotonic()
            if left <= 0:
                out.append(f"{args.host}: no token after {args.timeout:g} s: {last}")
                return None
            await asyncio.sleep(min(RETRY_S, left))


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not args.name.startswith("local/"):
        args.name = f"local/{args.name}"
    if not NAME.match(args.name):
        print(
            f"--name {args.name!r}: local/ and 1-40 of letters, digits, - _ / \\ # and space",
            file=sys.stderr,
        )
        return 1
    path = Path(args.token_file or f"homewizard-{args.host.replace(':', '_')}.token")
    problems: list[str] = []
    try:
        token = asyncio.run(pair(args, problems))
    except (DeviceError, ssl.SSLError) as exc:  # the CA file is unreadable or not a CA
        print(f"{args.host}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    if token is None:
        print("\n".join(problems), file=sys.stderr)
        return 1
    try:
        write_token(path, token)
    except OSError as exc:
        print(f"cannot write {path}: {exc}", file=sys.stderr)
        return 1
    print(f"Paired as {args.name}; token written to {path} (mode 0600). In the flow:")
    port = f"\n  port: {args.port}" if args.port else ""
    print(
        f"  type: http_poll\n  profile: homewizard_p1\n  host: {args.host}{port}\n  api: v2\n"
        f"  token_file: {path.resolve()}"
    )
    return 0
