"""The files the operator names: key files and the model server's CA bundle, read and checked.

They sit below everything that reads them: the options check them at parse
time, so that a bad file is a usage error that names its flag, and the key
ring (L{llmgw.keys}) and the upstream client (L{llmgw.upstream}) load them to
serve.  Reading the same way in both places means a file the options accept
is one the gateway can use, and the options need not reach up the request
path to find out.
"""

from __future__ import annotations

from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.ssl import Certificate, trustRootFromCertificates

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


def read_keys(path: str) -> list[bytes]:
    """One key a line; blank lines and C{#} comments are skipped."""
    with open(path, "rb") as f:
        lines = [line.split(b"#", 1)[0].strip() for line in f]
    return [line for line in lines if line]


def read_secret(path: str) -> bytes:
    """The first non-blank, non-comment line of C{path}."""
    keys = read_keys(path)
    if not keys:
        raise ValueError(f"{path} holds no key")
    return keys[0]


def read_client_keys(path: str) -> list[bytes]:
    """
    The client keys of an C{--api-keys-file}.

    @raise ValueError: it holds none.  Half-written during a rotation, most
        likely: locking every client out is never what the operator meant.
    """
    keys = read_keys(path)
    if not keys:
        raise ValueError(f"{path} holds no key")
    return keys


def load_trust_root(path: str) -> IOpenSSLTrustRoot:
    """
    Trust exactly the certificates in a PEM bundle.

    @raise ValueError: the file holds no certificate, or one that does not parse.
    """
    with open(path, "rb") as f:
        pem = f.read()
    blocks = [_PEM_BEGIN + block for block in pem.split(_PEM_BEGIN)[1:]]
    if not blocks:
        raise ValueError("no PEM certificate in the file")
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise ValueError(f"a certificate does not parse ({e})") from None
    trust: IOpenSSLTrustRoot = trustRootFromCertificates(certificates)
    return trust
