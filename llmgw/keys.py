"""Secrets read from files: the model server's key, and the keys clients must present.

Keys come from files, never from the command line (C{ps} shows arguments to
every user), and are reloaded on SIGHUP so they can be rotated without dropping
a connection.  Client keys are kept only as SHA-256 digests and compared in
constant time, so neither the log nor a timing side channel gives them away.
"""

from __future__ import annotations

import hashlib
import hmac

from twisted.logger import Logger

from llmgw.files import read_client_keys, read_secret

log = Logger()


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an C{Authorization: Bearer <token>} header, if that is what it is."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


class KeyRing:
    """
    The upstream key and the accepted client keys, reloadable as a unit.

    @ivar upstream_authorization: the C{Authorization} value to send to the
        model server, or L{None} to pass the client's own header through.
    """

    def __init__(self, aikey_file: str | None, api_keys_file: str | None) -> None:
        self.aikey_file = aikey_file
        self.api_keys_file = api_keys_file
        self.upstream_authorization: bytes | None = None
        self._client_digests: tuple[bytes, ...] = ()
        self.load()

    @property
    def requires_client_key(self) -> bool:
        return self.api_keys_file is not None

    def load(self) -> None:
        """Read both files; on failure keep the keys already loaded and raise."""
        upstream = None
        if self.aikey_file is not None:
            upstream = b"Bearer " + read_secret(self.aikey_file)
        digests: tuple[bytes, ...] = ()
        if self.api_keys_file is not None:
            digests = tuple(_digest(key) for key in read_client_keys(self.api_keys_file))
        self.upstream_authorization = upstream
        self._client_digests = digests

    def reload(self) -> None:
        """SIGHUP: rotate keys; a broken file is logged and the old keys stay."""
        try:
            self.load()
        except (OSError, ValueError) as e:
            log.error("Keeping the old keys; reloading failed: {why}", why=str(e))
        else:
            log.info("Reloaded keys ({count} client keys)", count=len(self._client_digests))

    def accepts(self, token: bytes | None) -> bool:
        """Whether C{token} is a client key, comparing every key in constant time."""
        if token is None:
            return False
        presented = _digest(token)
        found = False
        for digest in self._client_digests:
            found |= hmac.compare_digest(presented, digest)
        return found

    def client_identity(self, token: bytes) -> str:
        """What the limiter counts by under C{--rate-key key}: never the key itself."""
        return "key:" + _digest(token).hex()[:32]
