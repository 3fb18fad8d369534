"""Sans-I/O parser for the MLS (RFC 9420) wire format, as a delivery service sees it.

Entry points take bytes and return frozen dataclasses; every failure is a
:class:`~protocol.errors.RelayError` subclass:

* :class:`~protocol.errors.MLSDecodeError` (``MalformedMLS``): the bytes do not
  parse (truncated, trailing bytes, non-minimal varint, bad presence byte, ...);
  its subclass :class:`~protocol.errors.MLSUnsupportedError` (``UnsupportedMLS``)
  when an unknown type code leaves nothing to read past.
* :class:`~protocol.errors.MLSValidationError` (``InvalidMLS``): parses but fails
  a check; :class:`~protocol.errors.MLSUnsupportedCipherSuite` for suites
  outside 1..7.

Framing is never sniffed: the caller says whether it holds an MLSMessage or a
bare KeyPackage.
"""

from protocol.mls.content import Commit, Proposal, ProposalOrRef
from protocol.mls.crypto import (
    hash_bytes,
    key_package_ref,
    ref_hash,
    sign_with_label,
    suite_info,
    verify_key_package,
    verify_leaf_node,
    verify_with_label,
)
from protocol.mls.framing import FramedContent, PrivateMessage, PublicMessage, Sender
from protocol.mls.group import GroupContext, GroupInfo, Welcome
from protocol.mls.leaf import KeyPackage, LeafNode, encode_key_package, encode_leaf_node
from protocol.mls.messages import (
    MLSMessage,
    encode_mls_message,
    parse_key_package,
    parse_mls_message,
)
from protocol.mls.structs import (
    MLS10,
    Capabilities,
    ContentType,
    Credential,
    CredentialType,
    Extension,
    LeafNodeSource,
    Lifetime,
    ProposalType,
    SenderType,
    WireFormat,
)
from protocol.mls.validate import (
    KeyPackagePolicy,
    validate_handshake_framing,
    validate_key_package,
)

__all__ = [
    "MLS10",
    "Capabilities",
    "Commit",
    "ContentType",
    "Credential",
    "CredentialType",
    "Extension",
    "FramedContent",
    "GroupContext",
    "GroupInfo",
    "KeyPackage",
    "KeyPackagePolicy",
    "LeafNode",
    "LeafNodeSource",
    "Lifetime",
    "MLSMessage",
    "PrivateMessage",
    "Proposal",
    "ProposalOrRef",
    "ProposalType",
    "PublicMessage",
    "Sender",
    "SenderType",
    "Welcome",
    "WireFormat",
    "encode_key_package",
    "encode_leaf_node",
    "encode_mls_message",
    "hash_bytes",
    "key_package_ref",
    "parse_key_package",
    "parse_mls_message",
    "ref_hash",
    "sign_with_label",
    "suite_info",
    "validate_handshake_framing",
    "validate_key_package",
    "verify_key_package",
    "verify_leaf_node",
    "verify_with_label",
]
