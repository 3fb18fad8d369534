"""The MLS working group's test vectors: crypto-basics, welcome, messages, message-protection."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from protocol.errors import MLSDecodeError, MLSUnsupportedCipherSuite, MLSValidationError
from protocol.mls import (
    ContentType,
    KeyPackage,
    PrivateMessage,
    PublicMessage,
    SenderType,
    Welcome,
    WireFormat,
    encode_key_package,
    encode_mls_message,
    key_package_ref,
    parse_key_package,
    parse_mls_message,
    ref_hash,
    sign_with_label,
    validate_handshake_framing,
    verify_key_package,
    verify_leaf_node,
    verify_with_label,
)
from protocol.mls import content as c
from protocol.mls import group as g
from protocol.mls import messages as m
from protocol.mls.tls import Reader, Writer, decode_exact, encode_with
from tests.vectorfiles import vector_path


def load(name: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(vector_path(name).read_text())
    return entries


def h(value: str) -> bytes:
    return bytes.fromhex(value)


# --- crypto-basics ---------------------------------------------------------------


def test_crypto_basics_ref_hash() -> None:
    entries = load("mlswg/crypto-basics.json")
    assert sorted(e["cipher_suite"] for e in entries) == list(range(1, 8))
    for e in entries:
        rh = e["ref_hash"]
        got = ref_hash(e["cipher_suite"], rh["label"].encode(), h(rh["value"]))
        assert got.hex() == rh["out"], e["cipher_suite"]


def test_crypto_basics_sign_with_label() -> None:
    for e in load("mlswg/crypto-basics.json"):
        suite, swl = e["cipher_suite"], e["sign_with_label"]
        pub, content, label = h(swl["pub"]), h(swl["content"]), swl["label"]
        assert verify_with_label(suite, pub, label, content, h(swl["signature"])), suite
        # our own signature verifies too (ECDSA is randomised, so compare by verifying)
        ours = sign_with_label(suite, h(swl["priv"]), label, content)
        assert verify_with_label(suite, pub, label, content, ours), suite
        # the label is bound: same bytes under another label must fail
        assert not verify_with_label(suite, pub, label + "x", content, h(swl["signature"]))
        assert not verify_with_label(suite, pub, label, content + b"\x00", ours)
        # a malformed key is a failed verification, not an exception
        assert not verify_with_label(suite, pub[:-1], label, content, ours)


def test_unsupported_suite_is_typed() -> None:
    with pytest.raises(MLSUnsupportedCipherSuite):
        ref_hash(0x0A0A, b"label", b"value")
    with pytest.raises(MLSUnsupportedCipherSuite):
        verify_with_label(8, b"k", "l", b"c", b"s")


# --- welcome.json ------------------------------------------------------------------


def test_welcome_new_member_is_key_package_ref() -> None:
    entries = load("mlswg/welcome.json")
    assert sorted(e["cipher_suite"] for e in entries) == list(range(1, 8))
    for e in entries:
        kp = parse_key_package(h(e["key_package"]), bare=False)
        assert kp.cipher_suite == e["cipher_suite"]
        assert kp.raw == h(e["key_package"])[4:]  # KeyPackageRef input: no header
        msg = parse_mls_message(h(e["welcome"]), expect=WireFormat.WELCOME)
        assert isinstance(msg.body, Welcome)
        assert msg.body.cipher_suite == e["cipher_suite"]
        assert key_package_ref(kp) == msg.body.secrets[0].new_member
        assert verify_key_package(kp)
        assert verify_leaf_node(kp.leaf_node, kp.cipher_suite)


def test_welcome_key_package_signature_checks_fail_on_tampering() -> None:
    e = load("mlswg/welcome.json")[0]
    kp = parse_key_package(h(e["key_package"]), bare=False)
    sig = bytearray(kp.signature)
    sig[0] ^= 1
    raw = kp.raw.replace(kp.signature, bytes(sig))
    assert not verify_key_package(parse_key_package(raw))


# --- messages.json ------------------------------------------------------------------

Codec = tuple[Callable[[Reader], Any], Callable[[Writer, Any], None]]
MESSAGE = (m.read_mls_message, m.write_mls_message)
CODECS: dict[str, Codec] = {
    "mls_welcome": MESSAGE,
    "mls_group_info": MESSAGE,
    "mls_key_package": MESSAGE,
    "public_message_application": MESSAGE,
    "public_message_proposal": MESSAGE,
    "public_message_commit": MESSAGE,
    "private_message": MESSAGE,
    "ratchet_tree": (g.read_ratchet_tree, g.write_ratchet_tree),
    "group_secrets": (g.read_group_secrets, g.write_group_secrets),
    "add_proposal": (c.read_add, c.write_proposal_body),
    "update_proposal": (c.read_update, c.write_proposal_body),
    "remove_proposal": (c.read_remove, c.write_proposal_body),
    "pre_shared_key_proposal": (c.read_pre_shared_key, c.write_proposal_body),
    "re_init_proposal": (c.read_reinit, c.write_proposal_body),
    "external_init_proposal": (c.read_external_init, c.write_proposal_body),
    "group_context_extensions_proposal": (c.read_group_context_extensions, c.write_proposal_body),
    "commit": (c.read_commit, c.write_commit),
}
EXPECTED_WIRE_FORMAT = {
    "mls_welcome": WireFormat.WELCOME,
    "mls_group_info": WireFormat.GROUP_INFO,
    "mls_key_package": WireFormat.KEY_PACKAGE,
    "public_message_application": WireFormat.PUBLIC_MESSAGE,
    "public_message_proposal": WireFormat.PUBLIC_MESSAGE,
    "public_message_commit": WireFormat.PUBLIC_MESSAGE,
    "private_message": WireFormat.PRIVATE_MESSAGE,
}


def test_messages_every_field_decodes_and_reencodes() -> None:
    entries = load("mlswg-subsets/messages.30-entries.json")
    assert len(entries) == 30
    checked = 0
    for i, entry in enumerate(entries):
        assert set(entry) == set(CODECS), i
        for name, value in entry.items():
            read, write = CODECS[name]
            data = h(value)
            obj = decode_exact(data, read, name)
            assert encode_with(write, obj) == data, (i, name)
            if name in EXPECTED_WIRE_FORMAT:
                assert obj.wire_format is EXPECTED_WIRE_FORMAT[name], (i, name)
            checked += 1
    assert checked == 30 * 17


def test_messages_content_types_and_spans() -> None:
    for entry in load("mlswg-subsets/messages.30-entries.json"):
        app = parse_mls_message(h(entry["public_message_application"])).body
        assert isinstance(app, PublicMessage)
        assert app.content_type is ContentType.APPLICATION
        assert app.content.application_data is not None
        prop = parse_mls_message(h(entry["public_message_proposal"])).body
        assert isinstance(prop, PublicMessage) and prop.content.proposal is not None
        commit = parse_mls_message(h(entry["public_message_commit"])).body
        assert isinstance(commit, PublicMessage) and commit.content.commit is not None
        assert commit.confirmation_tag is not None
        info = parse_mls_message(h(entry["mls_group_info"]), expect=WireFormat.GROUP_INFO).body
        assert isinstance(info, g.GroupInfo)
        assert h(entry["mls_group_info"])[4:].startswith(info.tbs)
        kp = parse_key_package(h(entry["mls_key_package"]), bare=False)
        assert encode_key_package(kp) == kp.raw == h(entry["mls_key_package"])[4:]
        assert kp.raw == kp.tbs + encode_with(Writer.opaque, kp.signature)


def test_bare_key_package_is_not_sniffed() -> None:
    # add_proposal holds a bare KeyPackage: it starts 0001 0001, like a PublicMessage.
    entry = load("mlswg-subsets/messages.30-entries.json")[0]
    bare = h(entry["add_proposal"])
    assert bare[:4] == bytes.fromhex("00010001")
    assert isinstance(parse_key_package(bare, bare=True), KeyPackage)
    # Read as an MLSMessage it is (at best) a PublicMessage, never a KeyPackage.
    with pytest.raises((MLSValidationError, MLSDecodeError)):
        parse_mls_message(bare, expect=WireFormat.KEY_PACKAGE)


# --- message-protection.json ---------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "content_type"),
    [
        ("proposal_pub", ContentType.PROPOSAL),
        ("commit_pub", ContentType.COMMIT),
        ("proposal_priv", ContentType.PROPOSAL),
        ("commit_priv", ContentType.COMMIT),
        ("application_priv", ContentType.APPLICATION),
    ],
)
def test_message_protection_cleartext_fields(field: str, content_type: ContentType) -> None:
    entries = load("mlswg/message-protection.json")
    assert len(entries) == 7
    for e in entries:
        data = h(e[field])
        msg = parse_mls_message(data)
        assert encode_mls_message(msg) == data
        assert msg.group_id == h(e["group_id"])
        assert msg.epoch == e["epoch"]
        assert msg.content_type is content_type
        body = msg.body
        if field.endswith("_pub"):
            assert isinstance(body, PublicMessage)
            assert body.sender.sender_type is SenderType.MEMBER
            assert body.sender.leaf_index == 1
            assert body.membership_tag is not None
            # the framed proposal/commit is the one the vector gives separately
            if content_type is ContentType.PROPOSAL:
                assert body.content.proposal == decode_exact(
                    h(e["proposal"]), c.read_proposal, "proposal"
                )
            else:
                assert body.content.commit == decode_exact(h(e["commit"]), c.read_commit, "c")
        else:
            assert isinstance(body, PrivateMessage)


def test_expect_wire_format_is_enforced() -> None:
    e = load("mlswg/welcome.json")[0]
    with pytest.raises(MLSValidationError) as info:
        parse_mls_message(h(e["welcome"]), expect=WireFormat.KEY_PACKAGE)
    assert info.value.details == {"field": "wire_format", "offset": 2}
    with pytest.raises(MLSValidationError):
        parse_key_package(h(e["welcome"]), bare=False)
    both = {WireFormat.WELCOME, WireFormat.GROUP_INFO}
    assert parse_mls_message(h(e["welcome"]), expect=both).wire_format is WireFormat.WELCOME


def test_public_application_messages_are_refused() -> None:
    entry = load("mlswg-subsets/messages.30-entries.json")[0]
    app = parse_mls_message(h(entry["public_message_application"]))  # valid syntax
    with pytest.raises(MLSValidationError, match="PrivateMessage"):
        validate_handshake_framing(app)
    for key in ("public_message_commit", "public_message_proposal", "private_message"):
        validate_handshake_framing(parse_mls_message(h(entry[key])))


def test_protocol_package_does_not_import_trio() -> None:
    code = "import sys, protocol.mls; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
