"""RFC 9420 code points and the small structures shared by larger ones.

Each structure has a frozen dataclass, ``read_x(Reader) -> X`` and
``write_x(Writer, X)``.  Writers produce the canonical encoding, and readers
accept only canonical encodings (minimal varints, presence bytes 0/1), so
``write(read(b)) == b`` for every accepted ``b``.

Values that the RFC lets grow through IANA registries and GREASE (cipher
suites, extension/proposal/credential types in capabilities) stay plain ints;
only select discriminators, which decide how to read what follows, are enums.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from protocol.mls.tls import Reader, Writer

#: ProtocolVersion mls10.
MLS10 = 1


class WireFormat(IntEnum):
    PUBLIC_MESSAGE = 1
    PRIVATE_MESSAGE = 2
    WELCOME = 3
    GROUP_INFO = 4
    KEY_PACKAGE = 5

    @property
    def rfc_name(self) -> str:
        return "mls_" + self.name.lower()


class SenderType(IntEnum):
    MEMBER = 1
    EXTERNAL = 2
    NEW_MEMBER_PROPOSAL = 3
    NEW_MEMBER_COMMIT = 4


class ContentType(IntEnum):
    APPLICATION = 1
    PROPOSAL = 2
    COMMIT = 3


class LeafNodeSource(IntEnum):
    KEY_PACKAGE = 1
    UPDATE = 2
    COMMIT = 3


class CredentialType(IntEnum):
    BASIC = 1
    X509 = 2


class ProposalType(IntEnum):
    ADD = 1
    UPDATE = 2
    REMOVE = 3
    PSK = 4
    REINIT = 5
    EXTERNAL_INIT = 6
    GROUP_CONTEXT_EXTENSIONS = 7


class ProposalOrRefType(IntEnum):
    PROPOSAL = 1
    REFERENCE = 2


class PSKType(IntEnum):
    EXTERNAL = 1
    RESUMPTION = 2


class NodeType(IntEnum):
    LEAF = 1
    PARENT = 2


# --- Extension ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Extension:
    """Kept opaque: the relay does not interpret extension payloads."""

    extension_type: int
    extension_data: bytes


def read_extension(r: Reader) -> Extension:
    return Extension(r.uint16("extension_type"), r.opaque("extension_data"))


def write_extension(w: Writer, ext: Extension) -> None:
    w.uint16(ext.extension_type)
    w.opaque(ext.extension_data)


def read_extensions(r: Reader, field: str = "extensions") -> tuple[Extension, ...]:
    return r.vector(field, read_extension)


def write_extensions(w: Writer, exts: tuple[Extension, ...]) -> None:
    w.vector(exts, write_extension)


# --- Credential --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credential:
    """``identity`` for basic credentials, ``certificates`` (DER, leaf first) for x509."""

    credential_type: CredentialType
    identity: bytes | None = None
    certificates: tuple[bytes, ...] = ()


def read_credential(r: Reader) -> Credential:
    ctype = r.enum(CredentialType, 2, "credential_type")
    if ctype is CredentialType.BASIC:
        return Credential(ctype, identity=r.opaque("identity"))
    # struct { opaque cert_data<V>; } Certificate;
    certs = r.vector("certificates", lambda sub: sub.opaque("cert_data"))
    return Credential(ctype, certificates=certs)


def write_credential(w: Writer, cred: Credential) -> None:
    w.uint16(cred.credential_type)
    if cred.credential_type is CredentialType.BASIC:
        w.opaque(cred.identity or b"")
    else:
        w.vector(cred.certificates, Writer.opaque)


# --- Capabilities / Lifetime / HPKECiphertext -----------------------------------


@dataclass(frozen=True, slots=True)
class Capabilities:
    versions: tuple[int, ...]
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]
    proposals: tuple[int, ...]
    credentials: tuple[int, ...]


_CAPABILITY_FIELDS = ("versions", "cipher_suites", "extensions", "proposals", "credentials")


def read_capabilities(r: Reader) -> Capabilities:
    lists = [r.vector(name, lambda sub: sub.uint16("item")) for name in _CAPABILITY_FIELDS]
    return Capabilities(*lists)


def write_capabilities(w: Writer, caps: Capabilities) -> None:
    for name in _CAPABILITY_FIELDS:
        w.vector(getattr(caps, name), Writer.uint16)


@dataclass(frozen=True, slots=True)
class Lifetime:
    """Seconds since the Unix epoch; many real KeyPackages use ``0 .. 2**64-1``."""

    not_before: int
    not_after: int


def read_lifetime(r: Reader) -> Lifetime:
    return Lifetime(r.uint64("not_before"), r.uint64("not_after"))


def write_lifetime(w: Writer, lifetime: Lifetime) -> None:
    w.uint64(lifetime.not_before)
    w.uint64(lifetime.not_after)


@dataclass(frozen=True, slots=True)
class HPKECiphertext:
    kem_output: bytes
    ciphertext: bytes


def read_hpke_ciphertext(r: Reader) -> HPKECiphertext:
    return HPKECiphertext(r.opaque("kem_output"), r.opaque("ciphertext"))


def write_hpke_ciphertext(w: Writer, ct: HPKECiphertext) -> None:
    w.opaque(ct.kem_output)
    w.opaque(ct.ciphertext)
