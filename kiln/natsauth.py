"""NATS decentralized (JWT) authentication: the keys of a deployment, the server configuration
that trusts them, and user credentials minted locally, without a round trip to any service.

The chain of trust is the one nats-server 2.10+ verifies in operator mode:

* the operator (self-signed JWT, written inline into the server configuration) signs
* the system account and the Kiln account (JetStream enabled), preloaded into the server's
  resolver; the operator's signing key signs
* one account per function (`account_jwt`), made when its first replica starts and
  pushed to the servers (`$SYS.REQ.CLAIMS.UPDATE`; the servers' "full" resolver keeps them):
  no JetStream of its own, only imports of what that function's replicas use from the Kiln
  account, which exports it (`KILN_EXPORTS`);
* the platform's users of the Kiln account are signed by the Kiln account's own key; every
  function account lists one account signing key (node agents hold it), which signs
* replicas' user JWTs, each for a fresh user nkey, carrying that user's publish and subscribe
  permissions and, optionally, an expiry. The Kiln account lists no signing key: a replica's
  credentials can never be for the Kiln account (nor can those issued before function accounts
  existed, which it used to list).

Why an account per function: NATS checks what a client publishes, not what the server publishes
for it, and JetStream answers a request (a direct get, a pull, an ack) on whatever reply subject
the client named: in the Kiln account that could be `$JS.API.STREAM.DELETE.<any stream>`. A
function account's replies stay in the function account, where nothing but that function's own
imports listens (docs/security.md).

A NATS JWT is ``b64url(header).b64url(claims).b64url(ed25519 signature of the first two parts by
the issuer's key)``, unpadded. nats-server does not verify ``jti``; we set it to the unpadded
base32 SHA-512/256 of the claims serialised with an empty ``jti``, as NATS tools do.

Seeds are secrets: they are kept out of ``repr`` and out of every error message. The key pairs of
the few seeds that sign (and their checks) are cached in memory for the life of the process.

Minting a user (`mint_user`) takes about 0.1 ms (measured: 95-110 µs on a 2-core development
machine): one ed25519 key derivation (the new user's), one signature, and base32 encodings.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import nkeys  # type: ignore[import-untyped]

__all__ = [
    "KILN_EXPORTS",
    "KILN_STREAM_EXPORTS",
    "Credentials",
    "Import",
    "Permissions",
    "Trust",
    "account_jwt",
    "derived_account_seed",
    "mint_user",
    "public_key_of_seed",
]

# The nkey roles and the version byte nkeys gives each (see the `nkeys` package).
_PREFIX_SEED = 18 << 3
_PREFIXES: dict[str, int] = {"operator": 14 << 3, "account": 0, "user": 20 << 3}

_ROLE_NAMES: dict[str, str] = {"operator": "an operator", "account": "an account", "user": "a user"}

_HEADER = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"ed25519-nkey"}').rstrip(b"=").decode()

# Unlimited account and user limits (-1), as `nsc` writes them; a zero would mean "none at all"
# (an account with `conn: 0` admits no connection).
_NATS_LIMITS: dict[str, int] = {"subs": -1, "data": -1, "payload": -1}
_ACCOUNT_LIMITS: dict[str, Any] = {
    **_NATS_LIMITS,
    "imports": -1,
    "exports": -1,
    "wildcards": True,  # a boolean in the JWT schema, not a count
    "conn": -1,
    "leaf": -1,
}
_JETSTREAM_LIMITS: dict[str, int] = {
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}

# Subject that matches every subject: a deny of it (with no allow list) means "nothing", because
# NATS reads an empty or missing allow list as "everything".
_EVERYTHING = ">"

# What the Kiln account offers function accounts: (subject, response type) of services (messages
# a replica sends the platform or JetStream, and their answers), and streams (messages the
# platform sends replicas). Public and namespace-free: only accounts this operator signed can
# import, and each function account imports only its own function's subjects
# (kiln.invoker.credentials.function_imports).
KILN_EXPORTS: tuple[tuple[str, str], ...] = (
    ("$JS.API.CONSUMER.MSG.NEXT.>", "Stream"),
    ("$JS.ACK.>", "Singleton"),
    ("$JS.API.DIRECT.GET.>", "Singleton"),
    ("$O.>", "Singleton"),
    ("$KV.>", "Singleton"),
    ("*.reply.>", "Singleton"),
    ("*.accepted.>", "Singleton"),
    ("*.hb.replica.*", "Singleton"),
    ("*.events.coldstart.*", "Singleton"),
    ("*.logs.*", "Singleton"),
    ("*.jobevents.>", "Singleton"),
    ("*.node.*.snapshots.*", "Singleton"),
)
KILN_STREAM_EXPORTS: tuple[str, ...] = ("*.replica.>",)


@dataclass(frozen=True)
class Permissions:
    """What a user may publish to and subscribe to.

    Each of `publish` and `subscribe` is a tuple of allowed subjects (wildcards allowed), where
    ``()`` means *nothing at all* (written to the JWT as a deny of ``>``, since NATS would read an
    empty allow list as "everything"), and ``None`` means *anything* (no restriction written).
    `allow_responses` additionally lets the user publish one reply to the reply subject of each
    message it receives (``resp: {max: 1}``; the server's default window of two minutes), even
    where `publish` allows nothing. (nats-server treats a response permission without a publish
    allow list as "replies only", so with ``publish=None`` no response permission is written:
    replies are then allowed like everything else.)

    `Permissions.UNRESTRICTED` is the user who may do anything in its account.
    """

    publish: tuple[str, ...] | None = ()
    subscribe: tuple[str, ...] | None = ()
    allow_responses: bool = False

    UNRESTRICTED: ClassVar[Permissions]

    def __post_init__(self) -> None:
        for direction in ("publish", "subscribe"):
            subjects = getattr(self, direction)
            if subjects is None:
                continue
            if not isinstance(subjects, tuple):
                raise TypeError(
                    f"Permissions.{direction} must be a tuple of subjects or None, "
                    f"not {type(subjects).__name__}"
                )
            for subject in subjects:
                _check_subject(subject, direction)

    def _claims(self) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "pub": _direction_claims(self.publish),
            "sub": _direction_claims(self.subscribe),
        }
        if self.allow_responses and self.publish is not None:
            claims["resp"] = {"max": 1, "ttl": 0}
        return claims


Permissions.UNRESTRICTED = Permissions(publish=None, subscribe=None)


def _check_subject(subject: object, direction: str) -> None:
    if not isinstance(subject, str):
        raise TypeError(f"{direction} subject {subject!r} is not a string")
    tokens = subject.split(".")
    if (
        not subject
        or any(char.isspace() for char in subject)
        or "" in tokens
        or (_EVERYTHING in tokens[:-1])
        or any(_EVERYTHING in token and token != _EVERYTHING for token in tokens)
        or any("*" in part and part != "*" for part in tokens)
    ):
        raise ValueError(f"{direction} subject {subject!r} is not a valid NATS subject")


def _direction_claims(subjects: tuple[str, ...] | None) -> dict[str, list[str]]:
    if subjects is None:
        return {}
    if not subjects:
        return {"deny": [_EVERYTHING]}
    return {"allow": list(subjects)}


@dataclass(frozen=True)
class Credentials:
    """A user's JWT and nkey seed: what a client needs to connect."""

    jwt: str
    seed: str = field(repr=False)

    def creds_file_text(self) -> str:
        """The text of a ``.creds`` file, in the layout `nsc` writes and every client parses
        (nats-py: ``nats.connect(user_credentials=path)``, or from memory with
        ``user_credentials=nats.aio.client.RawCredentials(text)``)."""
        return (
            "-----BEGIN NATS USER JWT-----\n"
            f"{self.jwt}\n"
            "------END NATS USER JWT------\n"
            "\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n"
            "\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{self.seed}\n"
            "------END USER NKEY SEED------\n"
            "\n"
            "*************************************************************\n"
        )

    def write(self, path: Path) -> None:
        """Write the ``.creds`` file at `path`, readable by its owner only (0600), atomically: a
        reader sees the old file or the whole new one, never a part."""
        path = Path(path)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:  # mkstemp makes it 0600
                handle.write(self.creds_file_text())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


@dataclass(frozen=True)
class Trust:
    """Every key of one NATS deployment, generated once (`generate`) and kept as a secret
    (`to_json` / `from_json`)."""

    operator_seed: str = field(repr=False)
    system_account_seed: str = field(repr=False)
    account_seed: str = field(repr=False)  # the Kiln account, JetStream enabled
    signing_seed: str = field(repr=False)  # the function accounts' signing key (node agents)
    operator_signing_seed: str = field(repr=False)  # signs the function accounts

    _JSON_FIELDS: ClassVar[tuple[str, ...]] = (
        "operator_seed",
        "system_account_seed",
        "account_seed",
        "signing_seed",
        "operator_signing_seed",
    )

    def __post_init__(self) -> None:
        _signer(self.operator_seed, "operator", "operator_seed")
        _signer(self.system_account_seed, "account", "system_account_seed")
        _signer(self.account_seed, "account", "account_seed")
        _signer(self.signing_seed, "account", "signing_seed")
        _signer(self.operator_signing_seed, "operator", "operator_signing_seed")
        keys = {self.system_account_public_key, self.account_public_key, self.signing_public_key}
        if len(keys) != 3:
            raise ValueError(
                "system_account_seed, account_seed and signing_seed must be three different keys"
            )

    @classmethod
    def generate(cls) -> Trust:
        return cls(
            operator_seed=_new_seed("operator"),
            system_account_seed=_new_seed("account"),
            account_seed=_new_seed("account"),
            signing_seed=_new_seed("account"),
            operator_signing_seed=_new_seed("operator"),
        )

    def to_json(self) -> str:
        return json.dumps({name: getattr(self, name) for name in self._JSON_FIELDS}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Trust:
        try:
            data = json.loads(text)
        except ValueError:
            raise ValueError("NATS trust is not valid JSON") from None
        if not isinstance(data, dict):
            raise ValueError("NATS trust must be a JSON object")
        # Written before function accounts existed: the operator gains a signing key.
        data.setdefault("operator_signing_seed", _new_seed("operator"))
        missing = [name for name in cls._JSON_FIELDS if not isinstance(data.get(name), str)]
        if missing:
            raise ValueError(f"NATS trust lacks string field(s): {', '.join(missing)}")
        return cls(**{name: data[name] for name in cls._JSON_FIELDS})

    @property
    def operator_public_key(self) -> str:
        return public_key_of_seed(self.operator_seed)

    @property
    def system_account_public_key(self) -> str:
        return public_key_of_seed(self.system_account_seed)

    @property
    def account_public_key(self) -> str:
        return public_key_of_seed(self.account_seed)

    @property
    def signing_public_key(self) -> str:
        return public_key_of_seed(self.signing_seed)

    @property
    def operator_signing_public_key(self) -> str:
        return public_key_of_seed(self.operator_signing_seed)

    def operator_jwt(self) -> str:
        operator = self.operator_public_key
        return _encode(
            _signer(self.operator_seed, "operator", "operator_seed"),
            {
                "name": "kiln",
                "sub": operator,
                "nats": {
                    "system_account": self.system_account_public_key,
                    "signing_keys": [self.operator_signing_public_key],
                    "type": "operator",
                    "version": 2,
                },
            },
        )

    def system_account_jwt(self) -> str:
        return _encode(
            _signer(self.operator_seed, "operator", "operator_seed"),
            {
                "name": "SYS",
                "sub": self.system_account_public_key,
                "nats": {"limits": _ACCOUNT_LIMITS, "type": "account", "version": 2},
            },
        )

    def account_jwt(self) -> str:
        return _encode(
            _signer(self.operator_seed, "operator", "operator_seed"),
            {
                "name": "KILN",
                "sub": self.account_public_key,
                "nats": {
                    "limits": {**_ACCOUNT_LIMITS, **_JETSTREAM_LIMITS},
                    "exports": _kiln_exports(),
                    "type": "account",
                    "version": 2,
                },
            },
        )

    def server_config(self, resolver_dir: Path) -> str:
        """The trust part of a nats-server configuration: the operator JWT inline, the system
        account and the Kiln account preloaded into a "full" resolver that keeps, in
        `resolver_dir`, the function accounts pushed to it. The caller adds `listen`,
        `jetstream` and the rest. A replica's JWT lists every subject it may use, so the
        CONNECT line that carries it outgrows the default 4 KiB limit: 32 KiB."""
        system_account = self.system_account_public_key
        return (
            "max_control_line: 32768\n"
            f'operator: "{self.operator_jwt()}"\n'
            f"system_account: {system_account}\n"
            f"resolver: {{ type: full, dir: {json.dumps(str(resolver_dir))} }}\n"
            "resolver_preload: {\n"
            f'  {system_account}: "{self.system_account_jwt()}"\n'
            f'  {self.account_public_key}: "{self.account_jwt()}"\n'
            "}\n"
        )

    def platform_user(self, name: str) -> Credentials:
        """A user of the Kiln account who may publish and subscribe to anything (JetStream API
        included)."""
        return mint_user(
            self.account_seed,
            account=self.account_public_key,
            name=name,
            permissions=Permissions.UNRESTRICTED,
        )

    def system_user(self, name: str = "sys") -> Credentials:
        """An unrestricted user of the system account (server monitoring requests, `$SYS.>`)."""
        return mint_user(
            self.system_account_seed,
            account=self.system_account_public_key,
            name=name,
            permissions=Permissions.UNRESTRICTED,
        )


def mint_user(
    signing_seed: str,
    *,
    account: str,
    name: str,
    permissions: Permissions,
    expires_at: float | None = None,
    sources: Sequence[str] = (),
) -> Credentials:
    """Credentials for a new user of `account` (the account's public key), signed with
    `signing_seed`: one of the account's signing keys, or the account's own seed. `expires_at`
    (seconds since the epoch, rounded down) ends the user's authority: the server refuses
    connections afterwards and closes those still open. `sources`, when given, are the only
    networks (CIDRs, such as ``10.0.0.7/32``) the user may connect from."""
    signer = _signer(signing_seed, "account", "signing_seed")
    _check_public_key(account, "account", "account")
    if not isinstance(permissions, Permissions):
        raise TypeError(f"permissions must be Permissions, not {type(permissions).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, not {type(name).__name__}")
    import nkeys

    user_seed = _new_seed("user")
    nats: dict[str, Any] = {
        **permissions._claims(),
        **_NATS_LIMITS,
        "type": "user",
        "version": 2,
    }
    if signer.public_key != account:
        nats["issuer_account"] = account
    if sources:
        nats["src"] = [str(ipaddress.ip_network(cidr, strict=False)) for cidr in sources]
    claims: dict[str, Any] = {
        "name": name,
        "sub": nkeys.from_seed(user_seed.encode()).public_key.decode(),
    }
    if expires_at is not None:
        if not math.isfinite(expires_at):
            raise ValueError(f"expires_at must be a finite time, not {expires_at!r}")
        claims["exp"] = math.floor(expires_at)
    claims["nats"] = nats
    return Credentials(jwt=_encode(signer, claims), seed=user_seed)


@dataclass(frozen=True)
class Import:
    """A subject an account takes from another account's exports: a service (its messages go to
    the exporter, answers come back) or, with `stream`, messages the exporter publishes."""

    subject: str
    account: str  # the exporting account's public key
    stream: bool = False


def account_jwt(
    operator_signing_seed: str,
    *,
    account: str,
    name: str,
    signing_key: str,
    imports: Sequence[Import],
) -> str:
    """The JWT of an account without JetStream (`account`: its public key) whose users are signed
    by `signing_key` (a public key) and which imports `imports`, signed by the operator's
    signing key."""
    signer = _signer(operator_signing_seed, "operator", "operator_signing_seed")
    _check_public_key(account, "account", "account")
    _check_public_key(signing_key, "account", "signing_key")
    claims = [
        {"name": i.subject, "subject": i.subject, "account": i.account,
         "type": "stream" if i.stream else "service"}
        for i in imports
    ]  # fmt: skip
    for i in imports:
        _check_subject(i.subject, "import")
        _check_public_key(i.account, "account", "import account")
    return _encode(
        signer,
        {
            "name": name,
            "sub": account,
            "nats": {
                "limits": _ACCOUNT_LIMITS,
                "signing_keys": [signing_key],
                "imports": claims,
                "type": "account",
                "version": 2,
            },
        },
    )


def derived_account_seed(secret_seed: str, label: str) -> str:
    """An account seed derived from the seed `secret_seed` and `label`: every process that holds
    `secret_seed` derives the same account for the same label (a function's id)."""
    raw = hmac.new(_decode_checked(secret_seed, "secret_seed", "seed"), label.encode(), "sha256")
    import nkeys

    return str(nkeys.encode_seed(raw.digest(), _PREFIXES["account"]).decode())


def _kiln_exports() -> list[dict[str, str]]:
    services = [
        {"name": subject, "subject": subject, "type": "service", "response_type": response}
        for subject, response in KILN_EXPORTS
    ]
    streams = [
        {"name": subject, "subject": subject, "type": "stream"} for subject in KILN_STREAM_EXPORTS
    ]
    return services + streams


def public_key_of_seed(seed: str) -> str:
    """The public key (``O…``, ``A…`` or ``U…``) of an operator, account or user seed."""
    return _signer(seed, None, "seed").public_key


@dataclass(frozen=True)
class _Signer:
    keypair: nkeys.KeyPair = field(repr=False)
    public_key: str


def _encode(issuer: _Signer, claims: dict[str, Any]) -> str:
    body = {"jti": "", "iat": int(time.time()), "iss": issuer.public_key, **claims}
    unhashed = json.dumps(body, separators=(",", ":")).encode()
    digest = hashlib.new("sha512_256", unhashed).digest()
    body["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    payload = _b64url(json.dumps(body, separators=(",", ":")).encode())
    signed = f"{_HEADER}.{payload}"
    return f"{signed}.{_b64url(issuer.keypair.sign(signed.encode()))}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _new_seed(role: str) -> str:
    import nkeys

    return str(nkeys.encode_seed(os.urandom(32), _PREFIXES[role]).decode())


def _decode_checked(text: object, what: str, kind: str) -> bytes:
    """The raw bytes of an nkey (seed or public key) whose CRC16 checks out."""
    import nkeys

    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, not {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} is empty")
    try:
        encoded = text.strip().encode("ascii")
        raw = base64.b32decode(encoded + b"=" * (-len(encoded) % 8))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise ValueError(f"{what} is not a NATS {kind} (not base32)") from None
    if len(raw) < 4 or nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
        raise ValueError(f"{what} is not a NATS {kind} (bad checksum)")
    return raw[:-2]


def _signer(seed: object, role: str | None, what: str) -> _Signer:
    """The key pair of `seed`, checked to be a well-formed seed of `role` (any role if None)."""
    if not isinstance(seed, str):
        raise ValueError(f"{what} must be a string, not {type(seed).__name__}")
    return _cached_signer(seed, role, what)


# Decoding and checking a seed and deriving its ed25519 key pair cost more than signing; a
# process signs with few keys, over and over. Only valid seeds are cached (exceptions are not).
@functools.lru_cache(maxsize=32)
def _cached_signer(seed: str, role: str | None, what: str) -> _Signer:
    raw = _decode_checked(seed, what, "seed")
    if len(raw) != 34 or raw[0] & 248 != _PREFIX_SEED:
        raise ValueError(f"{what} is not a NATS seed (a seed starts with S)")
    prefix = (raw[0] & 7) << 5 | (raw[1] & 248) >> 3
    roles = {value: key for key, value in _PREFIXES.items()}
    if prefix not in roles:
        raise ValueError(f"{what} is not an operator, account or user seed")
    if role is not None and roles[prefix] != role:
        raise ValueError(
            f"{what} must be {_ROLE_NAMES[role]} seed, not {_ROLE_NAMES[roles[prefix]]} seed"
        )
    import nkeys

    keypair = nkeys.from_seed(seed.strip().encode())
    return _Signer(keypair=keypair, public_key=keypair.public_key.decode())


@functools.lru_cache(maxsize=32)
def _check_public_key(key: object, role: str, what: str) -> None:
    raw = _decode_checked(key, what, "public key")
    if len(raw) != 33 or raw[0] != _PREFIXES[role]:
        raise ValueError(f"{what} is not a NATS {role} public key")
