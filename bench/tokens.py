"""bench/tokens.py: many distinct signed JWTs, one per line, for bench/guard.sh's fresh phase.

    python3 bench/tokens.py ALG PRIVATE_KEY COUNT OUT [--iss I] [--aud A] [--sub S] [--ttl SECONDS]

ALG is RS256, ES256 or EdDSA; PRIVATE_KEY a PEM (PKCS#8) private key of that type. Every token
has the same claims (iss, aud, sub, iat, exp = now + ttl) plus a `jti` of its own (0, 1, ...),
so no two are alike: each is a token the node has never verified. Needs the `cryptography`
package only. Signing runs on every usable core (RSA 2048 signs at ~1,200 tokens/s per core).
"""

import argparse
import base64
import json
import multiprocessing
import os
import sys
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

_key = None
_alg = None


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _init(alg: str, pem: bytes) -> None:
    global _key, _alg
    _alg = alg
    _key = serialization.load_pem_private_key(pem, password=None)
    want = {"RS256": rsa.RSAPrivateKey, "ES256": ec.EllipticCurvePrivateKey, "EdDSA": ed25519.Ed25519PrivateKey}[alg]
    if not isinstance(_key, want):
        raise SystemExit(f"the key is not a {alg} key")


def _sign(data: bytes) -> bytes:
    if _alg == "RS256":
        return _key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if _alg == "ES256":
        r, s = decode_dss_signature(_key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return _key.sign(data)


def _chunk(job):
    head, claims, start, end = job
    out = []
    for jti in range(start, end):
        payload = b64url(json.dumps(dict(claims, jti=str(jti)), separators=(",", ":")).encode())
        signing_input = f"{head}.{payload}"
        out.append(f"{signing_input}.{b64url(_sign(signing_input.encode()))}\n")
    return "".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("alg", choices=["RS256", "ES256", "EdDSA"])
    p.add_argument("key")
    p.add_argument("count", type=int)
    p.add_argument("out")
    p.add_argument("--iss", default="https://idp.bench")
    p.add_argument("--aud", default="bench")
    p.add_argument("--sub", default="bench-user")
    p.add_argument("--ttl", type=int, default=86400)
    a = p.parse_args()
    with open(a.key, "rb") as f:
        pem = f.read()
    _init(a.alg, pem)  # fail early, in this process, on a wrong key
    now = int(time.time())
    head = b64url(json.dumps({"alg": a.alg, "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"iss": a.iss, "aud": a.aud, "sub": a.sub, "iat": now, "exp": now + a.ttl}
    step = 2000
    jobs = [(head, claims, i, min(i + step, a.count)) for i in range(0, a.count, step)]
    procs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with open(a.out, "w") as f:
        if procs > 1 and len(jobs) > 1:
            with multiprocessing.Pool(procs, initializer=_init, initargs=(a.alg, pem)) as pool:
                for text in pool.imap(_chunk, jobs):
                    f.write(text)
        else:
            for job in jobs:
                f.write(_chunk(job))


if __name__ == "__main__":
    sys.exit(main())
