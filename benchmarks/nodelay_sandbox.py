"""`python -m shared sandbox` with TCP_NODELAY on every accepted connection (`--sandbox-nodelay`).

The stock sandbox writes an answer's headers and body in two send() calls on a socket with Nagle's algorithm on, so
the body waits for the client's delayed ACK of the headers: about 40 ms per request on Linux loopback. That stall
is an artefact of the sandbox, not of SendGrid or of the client, and it weighs 1,000 times per million contacts on
the naive baseline but ~34 times on the engine. This wrapper sets the standard library's disable_nagle_algorithm flag
on the sandbox's request handler and changes nothing else.
"""

from __future__ import annotations

from sandbox import server as sandbox

if __name__ == "__main__":
    sandbox._Handler.disable_nagle_algorithm = True
    raise SystemExit(sandbox.main())
