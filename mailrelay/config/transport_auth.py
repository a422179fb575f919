# -*- test-case-name: tests.test_config, tests.test_logger, tests.test_routes -*-
"""How a `[transports.NAME]` proves who we are: `auth`, the OAuth2 keys, and a TLS client certificate.

Part of the first stage of the journey (mailrelay.config), called by sections._transport.  In: the
transport's `_Reader` with its security, username and password_file already read.  Out: the keyword
values for config.Transport (auth, oauth2, client_cert, client_key), or a ConfigError naming the key.

Every key is asked for whatever `auth` says (the reader refuses keys nobody asked for, and the reference
test walks what is asked); the combinations are checked afterwards.  The grant files, the token
endpoint's CA file and the client certificate pair are opened here, so a wrong path stops the start.
RFCs: 6749 (OAuth2 grants; section 3.2 the token endpoint is TLS only), 7628 section 5 and 4954 section 4
(no bearer token or password before TLS).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from mailrelay.config.model import OAUTH2_AUTH, TRANSPORT_AUTH, OAuth2Config
from mailrelay.config.reader import _Reader


def transport_auth(t: _Reader, security: str, username: Optional[str],
                   password_file: Optional[Path]) -> dict[str, Any]:
    """auth, oauth2, client_cert and client_key for config.Transport, checked together."""
    default = "password" if username is not None else "none"
    auth = t.choice("auth", default, TRANSPORT_AUTH)
    oauth2 = _oauth2_keys(t)
    client_cert = t.path("client_cert", readable=True, allow_empty=True)
    client_key = t.path("client_key", readable=True, allow_empty=True)

    if auth == "password":
        if username is None:
            t.fail("username", 'required with auth = "password"')
        if password_file is None:
            t.fail("password_file", "required with username (a file holding the password)")
    else:
        if password_file is not None:
            t.fail("password_file", f'not used with auth = "{auth}"')
        if auth == "none" and username is not None:
            t.fail("username", 'not used with auth = "none" (no AUTH is sent)')
    given = [key for key, value in oauth2.items() if value]
    if auth in OAUTH2_AUTH:
        oauth = _oauth2(t, auth, security, username, oauth2)
    else:
        if given:
            t.fail(given[0], 'only with auth = "xoauth2" or "oauthbearer"')
        oauth = None

    if (client_cert is None) != (client_key is None):
        t.fail("client_key" if client_key is None else "client_cert",
               "give both client_cert and client_key, or neither")
    if client_cert is not None:
        if security == "none":
            t.fail("client_cert", 'a client certificate needs security = "starttls" or "tls"')
        from mailrelay.tls import client_certificate   # loads the pair now: a mismatch is refused at start
        try:
            client_certificate(client_cert, client_key)
        except ValueError as e:
            t.fail("client_cert", str(e))
    # Left "" when not written: Transport.auth_kind then says "password" or "none" by the username.
    return {"auth": auth if "auth" in t.data else "", "oauth2": oauth,
            "client_cert": client_cert, "client_key": client_key}


def _oauth2_keys(t: _Reader) -> dict[str, Any]:
    return {
        "oauth2_token_url": t.text("oauth2_token_url", "").strip(),
        "oauth2_client_id": t.text("oauth2_client_id", "").strip(),
        "oauth2_client_secret_file": t.path("oauth2_client_secret_file", readable=True, allow_empty=True),
        "oauth2_refresh_token_file": t.path("oauth2_refresh_token_file", readable=True, allow_empty=True),
        "oauth2_scope": t.text("oauth2_scope", "").strip(),
        "oauth2_ca_file": t.path("oauth2_ca_file", readable=True, allow_empty=True),
    }


def _oauth2(t: _Reader, auth: str, security: str, username: Optional[str], keys: dict[str, Any]) -> OAuth2Config:
    if username is None:
        t.fail("username", f'required with auth = "{auth}" (the mailbox the token is for)')
    if security == "none":
        # RFC 7628 section 5: a bearer token is as good as a password to whoever reads it.
        t.fail("auth", f'auth = "{auth}" needs security = "starttls" or "tls" (a token is never sent in plaintext)')
    url = keys["oauth2_token_url"]
    if not url:
        t.fail("oauth2_token_url", f'required with auth = "{auth}"')
    try:
        parts = urlsplit(url)
        parts.port   # noqa: B018 -- raises ValueError for a port out of range
    except ValueError as e:
        t.fail("oauth2_token_url", f'"{url}" is not a URL: {e}')
    if parts.scheme.lower() != "https" or not parts.hostname:
        # RFC 6749 section 3.2: the token endpoint MUST be reached over TLS (it receives the client secret).
        t.fail("oauth2_token_url", f'"{url}" must be an https:// URL (the grant secret travels to it)')
    if parts.username or parts.password:
        t.fail("oauth2_token_url", "must not hold credentials (give oauth2_client_secret_file instead)")
    if not keys["oauth2_client_id"]:
        t.fail("oauth2_client_id", f'required with auth = "{auth}"')
    secret, refresh = keys["oauth2_client_secret_file"], keys["oauth2_refresh_token_file"]
    if secret is None and refresh is None:
        t.fail("oauth2_client_secret_file", "give oauth2_client_secret_file (client-credentials grant) or "
               "oauth2_refresh_token_file (refresh-token grant)")
    ca_file = keys["oauth2_ca_file"]
    if ca_file is not None:
        _check_pem(t, "oauth2_ca_file", ca_file)
    return OAuth2Config(token_url=url, client_id=keys["oauth2_client_id"], client_secret_file=secret,
                        refresh_token_file=refresh, scope=keys["oauth2_scope"], ca_file=ca_file)


def _check_pem(t: _Reader, key: str, path: Path) -> None:
    from cryptography import x509
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as e:
        t.fail(key, f"cannot load certificates from {path}: {' '.join(str(e).split())[:200]}")
