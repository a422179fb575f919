# -*- test-case-name: tests.test_ldap, tests.test_limits_end_to_end -*-
"""AUTH against LDAP / Active Directory: is this user name and password good, says the directory?

Where it sits: the SMTP session's AUTH PLAIN/LOGIN hands a `UsernamePassword` to the cred portal, which
asks this checker (beside the password-file checker).  In: the user name and password, `[auth.ldap]`.
Out: a Deferred firing with the user name (str); or failing with `UnauthorizedLogin` (wrong password,
unknown or ambiguous user, not in `require_group`, empty password, unacceptable name: 535 5.7.8) or with
`TemporaryAuthFailure` (no directory gave an answer: unreachable, timeout, TLS failure: 454 4.7.0).

How: one short connection per login.  `urls` are tried in order; a directory that cannot answer within
`timeout` seconds (connect, TLS and every operation together; each URL has its own) or fails in any
other way than a definite answer is skipped for the next one.  STARTTLS (RFC 4511 §4.14,
RFC 4513 §3) on ldap:// URLs when `starttls`; ldaps:// and STARTTLS verify the certificate against
`ca_file` (else the system trust store) and the host name (RFC 6125).  Then either

- direct bind: `bind_dn` with `{user}` DN-escaped (RFC 4514) and the user's password, or
- search-then-bind: bind as `service_dn` (password from `service_password_file`; no `service_dn`:
  anonymous search), search `search_base` for `search_filter` with `{user}` filter-escaped (RFC 4515),
  require exactly one entry, bind as its DN with the user's password (RFC 4513 §5.1.3).

`require_group`: the group entry lists the user's DN in `member` or `uniqueMember`, or the user entry's
`memberOf` names the group (both compared by the directory, so DN spelling does not matter).  With
`nested_groups` (the default) membership through groups inside the group counts too, as Windows
counts it: Active Directory answers that in one query (LDAP_MATCHING_RULE_IN_CHAIN); elsewhere the
groups are walked upward from the user under `group_base` (default: the group DN's dc= suffix) — the
groups listing the user, then those listing them, at most MAX_NESTING levels and MAX_NESTED_GROUPS
groups, cycles ignored.  In search-then-bind mode the group is checked as the service account, in
direct mode as the user.
A login is remembered `cache` seconds as a salted hash (mailrelay.server.ldap_cache).

Logins are case-insensitive, as the directory compares them (uid and sAMAccountName use caseIgnoreMatch,
RFC 4517 §4.2.11; DN values likewise): the directory is asked with the name as typed, and the identity
it gives the relay — rate limits, `users` lists, logs, the cache — is that name case-folded
(`str.casefold()`, Unicode full case folding, as RFC 4518 §2.2 prepares caseIgnore values), returned as
a realm.FoldedLogin.  ALICE, Alice and alice are one user "alice".

Active Directory: either `bind_dn = "{user}@corp.example"` (a UPN bind, no service account needed) or
`search_filter = "(&(objectClass=user)(sAMAccountName={user}))"` with a service account; `url =
"ldaps://dc1.corp.example:636"` (or ldap:// with `starttls = true`); `ca_file` = the enterprise CA.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from ldaptor.ldapfilter import InvalidLDAPFilter, parseFilter
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap.distinguishedname import DistinguishedName, RelativeDistinguishedName
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads, ssl
from zope.interface import implementer

from mailrelay.config import LDAPConfig
from mailrelay.logger import Logger
from mailrelay.server.ldap_cache import CredentialCache
from mailrelay.server.ldap_client import (
    NO_ATTRIBUTES, SCOPE_BASE, SCOPE_SUBTREE, SIZE_LIMIT_EXCEEDED, SUCCESS,
    DirectoryError, LDAPConnection, LDAPResultError, connect,
)
from mailrelay.server.ldap_text import (
    BadUsername, LDAPURL, check_username, escape_dn_value, escape_filter_value, parse_url, substitute,
)
from mailrelay.server.realm import FoldedLogin, TemporaryAuthFailure

# RFC 4511 Appendix A: result codes meaning "this server cannot decide now", not "wrong password":
# operationsError, protocolError, timeLimitExceeded, adminLimitExceeded, strongerAuthRequired,
# referral (not chased), unavailableCriticalExtension, confidentialityRequired, busy, unavailable,
# loopDetect, other.  Not unwillingToPerform (53): AD and slapd answer it for refused/disabled accounts.
TEMPORARY_CODES = frozenset({1, 2, 3, 8, 10, 11, 12, 13, 51, 52, 54, 80})
NO_SUCH_OBJECT, INSUFFICIENT_ACCESS = 32, 50


MAX_NESTING = 8             # group levels followed upward from the user
MAX_NESTED_GROUPS = 1000    # groups looked at in all, per login
IN_CHAIN = "1.2.840.113556.1.4.1941"     # Active Directory's LDAP_MATCHING_RULE_IN_CHAIN


def _listing(dns: list[str]) -> pureldap.LDAPFilter:
    """(|(member=dn1)(uniqueMember=dn1)(member=dn2)...): groups that list any of `dns`."""
    return pureldap.LDAPFilter_or([_equals(attribute, dn) for dn in dns for attribute in ("member", "uniqueMember")])


def _in_chain(attribute: str, value: str) -> pureldap.LDAPFilter_extensibleMatch:
    """(memberOf:1.2.840.113556.1.4.1941:=group): RFC 4511 4.5.1.7.7 extensible match."""
    return pureldap.LDAPFilter_extensibleMatch(
        matchingRule=pureldap.LDAPMatchingRuleAssertion_matchingRule(IN_CHAIN),
        type=pureldap.LDAPMatchingRuleAssertion_type(attribute),
        matchValue=pureldap.LDAPMatchingRuleAssertion_matchValue(value),
        dnAttributes=pureldap.LDAPMatchingRuleAssertion_dnAttributes(0))


def group_search_base(group: str) -> str:
    """Where to look for groups nested in `group`: the trailing dc= components of its DN (the whole
    naming context), or its parent when it has none."""
    rdns = DistinguishedName(group).split()
    suffix: list[RelativeDistinguishedName] = []
    for rdn in reversed(rdns):
        if len(rdn.split()) != 1 or rdn.split()[0].attributeType.lower() != "dc":
            break
        suffix.insert(0, rdn)
    chosen = suffix or rdns[1:]
    return DistinguishedName(listOfRDNs=chosen).getText() if chosen else group


def _equals(attribute: str, value: str) -> pureldap.LDAPFilter_equalityMatch:
    return pureldap.LDAPFilter_equalityMatch(
        attributeDesc=pureldap.LDAPAttributeDescription(attribute),
        assertionValue=pureldap.LDAPAssertionValue(value),
    )


def load_trust_root(ca_file: Optional[Path]):
    """The trust root for ldaps/STARTTLS: every certificate in `ca_file`, or the platform's store."""
    if ca_file is None:
        return ssl.platformTrust()
    try:
        certs = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load ca_file {ca_file}: {e}") from None
    return ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certs]
    )


def read_secret(path: Path) -> bytes:
    """The service account's password: the file's content without its final newline."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read service_password_file {path}: {e.strerror}") from None
    return data.rstrip(b"\r\n")


def _check_config(ldap: LDAPConfig) -> None:
    if not ldap.urls:
        raise ValueError("auth.ldap: no url")
    if ldap.bind_dn is not None:
        if "{user}" not in ldap.bind_dn:
            raise ValueError("auth.ldap.bind_dn: must contain {user}")
        return
    if not ldap.search_base or not ldap.search_filter or "{user}" not in ldap.search_filter:
        raise ValueError("auth.ldap: bind_dn, or search_base and a search_filter with {user}, is needed")
    try:
        parseFilter(substitute(ldap.search_filter, "x"))
    except InvalidLDAPFilter as e:
        raise ValueError(f"auth.ldap.search_filter: {e}") from None
    if ldap.service_dn and ldap.service_password_file is None:
        raise ValueError("auth.ldap: service_dn needs service_password_file")


@implementer(ICredentialsChecker)
class LDAPChecker:
    """Checks IUsernamePassword against the directories of `[auth.ldap]`."""

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(self, ldap: LDAPConfig, reactor=None):
        """ValueError (one line) for an unusable configuration: bad URL, filter, unreadable files."""
        if reactor is None:
            from twisted.internet import reactor
        _check_config(ldap)
        self._config = ldap
        self._reactor = reactor
        self._urls = tuple(parse_url(u) for u in ldap.urls)
        trust = load_trust_root(ldap.ca_file) if (ldap.starttls or any(u.tls for u in self._urls)) else None
        self._tls = {u: self._tls_options(u, trust) for u in self._urls if trust is not None}
        self._service_password = (read_secret(ldap.service_password_file)
                                  if ldap.service_dn and ldap.service_password_file else b"")
        if ldap.service_dn and not self._service_password:
            # RFC 4513 §5.1.2: an empty password would make the service bind an anonymous one.
            raise ValueError(f"auth.ldap.service_password_file: {ldap.service_password_file} is empty")
        self._cache = CredentialCache(ldap.cache, reactor)
        for url in self._urls:
            if not url.tls and not ldap.starttls:
                self.log.warn("LDAP {url}: neither ldaps:// nor starttls, passwords cross the network "
                              "in clear", url=str(url))

    @staticmethod
    def _tls_options(url: LDAPURL, trust):
        # Host name (or IP address) checked against the certificate: ldaptor's default checks nothing.
        return ssl.optionsForClientTLS(
            url.host, trustRoot=trust, extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
        )

    def __repr__(self) -> str:
        return f"<LDAPChecker {', '.join(map(str, self._urls))}>"

    # -- ICredentialsChecker -----------------------------------------------------------------------

    def requestAvatarId(self, credentials) -> defer.Deferred:
        try:
            user = check_username(credentials.username)
        except BadUsername as e:
            self.log.info("LDAP login refused: unacceptable user name ({why})", why=str(e))
            return defer.fail(UnauthorizedLogin("unacceptable user name"))
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        if not password:
            # RFC 4513 §5.1.2: a bind with a DN and an empty password is an unauthenticated bind, which
            # many directories (AD among them) answer with success.  Never let it reach the directory.
            self.log.info("LDAP login refused for {user}: empty password", user=user)
            return defer.fail(UnauthorizedLogin("empty password"))
        return defer.Deferred.fromCoroutine(self._login(user, password))

    @staticmethod
    def identity(user: str) -> FoldedLogin:
        """The relay's name for the directory login `user` (see the module docstring)."""
        return FoldedLogin(user.casefold())

    # -- the login -----------------------------------------------------------------------------------

    def _digest(self, user: str, password: bytes) -> defer.Deferred:
        """The cache's scrypt hash, computed in a worker thread (~10 ms: never on the reactor); a
        reactor without a thread pool (a test's memory reactor) hashes inline."""
        pool = getattr(self._reactor, "getThreadPool", None)
        if pool is None:
            return defer.maybeDeferred(self._cache.digest, user, password)
        return threads.deferToThreadPool(self._reactor, pool(), self._cache.digest, user, password)

    async def _login(self, typed: str, password: bytes) -> str:
        user = self.identity(typed)      # for the cache and the logs; the directory is asked with `typed`
        digest = None
        if self._cache.has_entry(user):
            digest = await self._digest(user, password)
            if self._cache.check_digest(user, digest):
                self.log.debug("LDAP login accepted for {user} from the cache", user=user)
                return user
        for url in self._urls:
            attempt = defer.Deferred.fromCoroutine(self._ask(url, typed, password))
            attempt.addTimeout(self._config.timeout, self._reactor)
            try:
                conn, refusal = await attempt
            except defer.TimeoutError:
                self.log.warn("LDAP directory {url}: no answer within {timeout}s", url=str(url),
                              timeout=self._config.timeout)
                continue
            except DirectoryError as e:
                self.log.warn("LDAP directory {url} unavailable: {why}", url=str(url), why=str(e))
                continue
            except Exception:
                self.log.failure("LDAP directory {url}: unexpected error", url=str(url))
                continue
            # The verdict is in; closing (bounded by its own grace period) cannot change it.
            await conn.close(self._reactor)
            if refusal is not None:
                self.log.info("LDAP login refused for {user} by {url}: {why}", user=user, url=str(url),
                              why=str(refusal))
                raise UnauthorizedLogin("bad credentials")
            self.log.info("LDAP login accepted for {user} by {url}", user=user, url=str(url))
            if self._cache.enabled:
                self._cache.remember_digest(user, digest or await self._digest(user, password))
            return user
        self.log.error("LDAP login for {user}: no directory answered", user=user)
        raise TemporaryAuthFailure("no LDAP directory answered")

    async def _ask(self, url: LDAPURL, user: str, password: bytes
                   ) -> tuple[LDAPConnection, Optional[UnauthorizedLogin]]:
        """One directory's verdict: (connection, None) yes, (connection, UnauthorizedLogin) its definite
        no; an exception (the connection already dropped) means this directory could not decide."""
        conn = await connect(self._reactor, url, self._tls.get(url))
        try:
            await self._decide(conn, url, user, password)
        except UnauthorizedLogin as refusal:
            return conn, refusal
        except BaseException:   # including the timeout's CancelledError
            await conn.abort()
            raise
        return conn, None

    async def _decide(self, conn: LDAPConnection, url: LDAPURL, user: str, password: bytes) -> None:
        if self._config.starttls and not url.tls:
            await conn.start_tls(self._tls[url])
        if self._config.bind_dn is not None:
            dn = substitute(self._config.bind_dn, escape_dn_value(user))
            await self._bind_user(conn, dn, password)
            await self._check_group(conn, dn)
        else:
            if self._config.service_dn:
                await self._bind_service(conn)
            dn = await self._find_user(conn, user)
            await self._check_group(conn, dn)
            await self._bind_user(conn, dn, password)

    async def _bind_user(self, conn: LDAPConnection, dn: str, password: bytes) -> None:
        try:
            await conn.bind(dn, password)
        except LDAPResultError as e:
            if e.code in TEMPORARY_CODES:
                raise DirectoryError(f"user bind: {e}") from None
            raise UnauthorizedLogin(f"bind refused: {e}") from None

    async def _bind_service(self, conn: LDAPConnection) -> None:
        assert self._config.service_dn is not None      # called only with a service account
        try:
            await conn.bind(self._config.service_dn, self._service_password)
        except LDAPResultError as e:
            # Not the client's fault: a temporary failure for it, and an error for the operator.
            raise DirectoryError(f"service account bind refused: {e}") from None

    async def _find_user(self, conn: LDAPConnection, user: str) -> str:
        # Without bind_dn, _check_config required both (the search-then-bind login).
        assert self._config.search_filter is not None and self._config.search_base is not None
        try:
            filter_ = parseFilter(substitute(self._config.search_filter, escape_filter_value(user)))
        except InvalidLDAPFilter:
            raise UnauthorizedLogin("user name does not fit the search filter") from None
        entries, code = await conn.search(
            self._config.search_base, SCOPE_SUBTREE, filter_, NO_ATTRIBUTES,
            size_limit=2, time_limit=max(1, math.ceil(self._config.timeout)),
        )
        if len(entries) > 1 or code == SIZE_LIMIT_EXCEEDED:
            raise UnauthorizedLogin("the search filter matches more than one entry")
        if code != SUCCESS:
            raise DirectoryError(f"user search: result {code}")
        if not entries:
            raise UnauthorizedLogin("no such user")
        if not entries[0][0]:
            # An empty DN would make the user's bind anonymous (RFC 4513 §5.1.1): never bind with it.
            raise UnauthorizedLogin("the directory returned an empty DN")
        return entries[0][0]

    async def _check_group(self, conn: LDAPConnection, dn: str) -> None:
        group = self._config.require_group
        if not group:
            return
        if await self._matches(conn, group, _listing([dn])):
            return
        if await self._matches(conn, dn, _equals("memberOf", group)):
            return
        if self._config.nested_groups and await self._nested_member(conn, dn, group):
            return
        raise UnauthorizedLogin("not a member of require_group")

    async def _nested_member(self, conn: LDAPConnection, dn: str, group: str) -> bool:
        """Is `dn` in `group` through groups that are members of it (any depth, bounded)?"""
        try:
            if await self._matches(conn, dn, _in_chain("memberOf", group)):
                return True
        except DirectoryError:
            pass        # a directory that does not know AD's matching rule may refuse the filter outright
        base = self._config.group_base or group_search_base(group)
        seen: set[str] = set()
        level = [dn]
        for _ in range(MAX_NESTING):
            entries, code = await conn.search(base, SCOPE_SUBTREE, _listing(level), NO_ATTRIBUTES,
                                              size_limit=MAX_NESTED_GROUPS)
            if code not in (SUCCESS, SIZE_LIMIT_EXCEEDED, NO_SUCH_OBJECT, INSUFFICIENT_ACCESS):
                raise DirectoryError(f"nested group search: result {code}")
            level = [d for d, _ in entries if d and d.lower() not in seen]
            if not level:
                return False
            if await self._matches(conn, group, _listing(level)):
                return True
            seen.update(d.lower() for d in level)
            if len(seen) >= MAX_NESTED_GROUPS:
                self.log.warn("ldap: more than {n} groups around require_group; nested membership not followed "
                         "further", n=MAX_NESTED_GROUPS)
                return False
        return False

    async def _matches(self, conn: LDAPConnection, base: str, filter_) -> bool:
        """Does the entry `base` match `filter_`?  An entry that is absent or hidden does not."""
        entries, code = await conn.search(base, SCOPE_BASE, filter_, NO_ATTRIBUTES, size_limit=1)
        if entries:
            return True
        if code in (SUCCESS, NO_SUCH_OBJECT, INSUFFICIENT_ACCESS):
            return False
        raise DirectoryError(f"group search: result {code}")
