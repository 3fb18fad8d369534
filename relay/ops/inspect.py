"""``mls-relay inspect``: describe one MLS object as a single JSON object.

    mls-relay inspect [FILE|-] [--hex|--binary|--auto] [--bare-key-package]
    python -m relay.inspect ...

Input is hex text or raw bytes, from FILE or stdin (``-``, the default).  With
``--auto`` (the default) the input is hex when, after whitespace, it holds only
hex digits: a binary MLS object always starts with byte 0x00, never a hex
digit, so this cannot misread binary input.  Framing is *not* guessed: the
input is an MLSMessage unless ``--bare-key-package`` says it is a bare
KeyPackage (the two can be byte-identical, see protocol/mls/messages.py).

Exit status 0 with the description on stdout; 1 with ``{"error", "message",
"field", "offset"}`` on stdout for unreadable or malformed input; 2 for usage
errors (argparse).  An invalid signature is reported as
``"signatures_valid": false`` with status 0: the object itself is well-formed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import string
import sys
from typing import Any, BinaryIO

from protocol.errors import MLSDecodeError, MLSUnsupportedCipherSuite, PayloadTooLarge, RelayError
from protocol.mls import (
    Credential,
    CredentialType,
    KeyPackage,
    MLSMessage,
    PrivateMessage,
    PublicMessage,
    Sender,
    key_package_ref,
    parse_key_package,
    parse_mls_message,
    verify_key_package,
)
from protocol.mls.content import Add, Commit, Proposal
from protocol.mls.group import GroupInfo, Welcome

#: Largest input read; MLS objects a relay handles are far smaller.
MAX_INPUT_BYTES = 16 * 1024 * 1024
_HEX_DIGITS = frozenset(string.hexdigits.encode())

Report = dict[str, Any]


# --- input -------------------------------------------------------------------------


def read_input(source: str, stdin: BinaryIO | None = None) -> bytes:
    """Read at most MAX_INPUT_BYTES (+1 to notice more) from a path or ``-``."""
    if source == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        data = stream.read(MAX_INPUT_BYTES + 1)
    else:
        with open(source, "rb") as handle:
            data = handle.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise PayloadTooLarge(f"input larger than {MAX_INPUT_BYTES} bytes")
    return data


def _looks_hex(text: bytes) -> bool:
    return bool(text) and all(byte in _HEX_DIGITS for byte in text)


def decode_input(data: bytes, mode: str) -> bytes:
    """Turn the raw input into object bytes according to ``--hex/--binary/--auto``."""
    if mode == "binary":
        return data
    text = b"".join(data.split())  # hex dumps often carry newlines and spaces
    text = text.removeprefix(b"0x")
    if mode == "auto" and not _looks_hex(text):
        return data
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MLSDecodeError(f"input is not valid hex: {exc}", field="input") from None


# --- description -----------------------------------------------------------------


def _name(value: Any) -> str:
    return str(value.name).lower()


def describe_credential(cred: Credential) -> Report:
    out: Report = {"type": _name(cred.credential_type)}
    if cred.credential_type is CredentialType.BASIC:
        identity = cred.identity or b""
        out["identity_hex"] = identity.hex()
        # Binary identities are shown as hex only.
        with contextlib.suppress(UnicodeDecodeError):
            out["identity"] = identity.decode("utf-8")
    else:
        out["certificate_count"] = len(cred.certificates)
    return out


def _signatures_valid(kp: KeyPackage) -> bool | None:
    try:
        return verify_key_package(kp)
    except MLSUnsupportedCipherSuite:
        return None  # cannot tell: no implementation for this suite


def describe_key_package(kp: KeyPackage) -> Report:
    leaf = kp.leaf_node
    out: Report = {
        "version": kp.version,
        "cipher_suite": kp.cipher_suite,
        "leaf_node_source": _name(leaf.leaf_node_source),
        "credential": describe_credential(leaf.credential),
    }
    try:
        out["key_package_ref"] = key_package_ref(kp).hex()
    except MLSUnsupportedCipherSuite:
        out["key_package_ref"] = None
    if leaf.lifetime is not None:
        out["lifetime"] = {
            "not_before": leaf.lifetime.not_before,
            "not_after": leaf.lifetime.not_after,
        }
    out["signatures_valid"] = _signatures_valid(kp)
    return out


def describe_sender(sender: Sender) -> Report:
    out: Report = {"type": _name(sender.sender_type)}
    if sender.leaf_index is not None:
        out["leaf_index"] = sender.leaf_index
    if sender.sender_index is not None:
        out["sender_index"] = sender.sender_index
    return out


def describe_proposal(proposal: Proposal) -> Report:
    out: Report = {"proposal_type": _name(proposal.proposal_type)}
    if isinstance(proposal.body, Add):
        out["key_package"] = describe_key_package(proposal.body.key_package)
    return out


def describe_commit(commit: Commit) -> Report:
    proposals = [
        _name(p.proposal.proposal_type) if p.proposal is not None else "reference"
        for p in commit.proposals
    ]
    return {"proposals": proposals, "has_path": commit.path is not None}


def describe_public_message(msg: PublicMessage) -> Report:
    content = msg.content
    out: Report = {
        "group_id": content.group_id.hex(),
        "epoch": content.epoch,
        "sender": describe_sender(content.sender),
        "content_type": _name(content.content_type),
        "authenticated_data": content.authenticated_data.hex(),
    }
    if content.proposal is not None:
        out.update(describe_proposal(content.proposal))
    if content.commit is not None:
        out.update(describe_commit(content.commit))
    return out


def describe_private_message(msg: PrivateMessage) -> Report:
    return {
        "group_id": msg.group_id.hex(),
        "epoch": msg.epoch,
        "content_type": _name(msg.content_type),
        "authenticated_data": msg.authenticated_data.hex(),
    }


def describe_group_info(info: GroupInfo) -> Report:
    ctx = info.group_context
    return {
        "cipher_suite": ctx.cipher_suite,
        "group_id": ctx.group_id.hex(),
        "epoch": ctx.epoch,
        "signer": info.signer,
        "extensions": [ext.extension_type for ext in info.extensions],
    }


def describe_welcome(welcome: Welcome) -> Report:
    return {
        "cipher_suite": welcome.cipher_suite,
        "new_members": [ref.hex() for ref in welcome.new_members],
    }


def describe_message(msg: MLSMessage) -> Report:
    out: Report = {"wire_format": msg.wire_format.rfc_name, "version": msg.version}
    body = msg.body
    if isinstance(body, PublicMessage):
        out.update(describe_public_message(body))
    elif isinstance(body, PrivateMessage):
        out.update(describe_private_message(body))
    elif isinstance(body, Welcome):
        out.update(describe_welcome(body))
    elif isinstance(body, GroupInfo):
        out.update(describe_group_info(body))
    else:
        out.update(describe_key_package(body))
    return out


def inspect_bytes(data: bytes, *, bare_key_package: bool = False) -> Report:
    """Parse ``data`` and describe it; raises RelayError subclasses on bad input."""
    if bare_key_package:
        report: Report = {"wire_format": "mls_key_package", "bare": True}
        report.update(describe_key_package(parse_key_package(data, bare=True)))
        return report
    return describe_message(parse_mls_message(data))


# --- command line ------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options, shared by ``mls-relay inspect`` and ``python -m relay.inspect``."""
    parser.add_argument("file", nargs="?", default="-", help="input file, or - for stdin")
    mode = parser.add_mutually_exclusive_group()
    for flag in ("hex", "binary", "auto"):
        mode.add_argument(
            f"--{flag}", dest="mode", action="store_const", const=flag, help=f"input is {flag}"
        )
    parser.set_defaults(mode="auto")
    parser.add_argument(
        "--bare-key-package",
        action="store_true",
        help="input is a bare KeyPackage, not an MLSMessage",
    )


DESCRIPTION = "Describe one MLS object (hex or binary, from FILE or stdin) as JSON."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mls-relay inspect", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def _emit(report: Report) -> None:
    sys.stdout.write(json.dumps(report, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Inspect with parsed options (``file``, ``mode``, ``bare_key_package``)."""
    try:
        data = decode_input(read_input(args.file), args.mode)
        report = inspect_bytes(data, bare_key_package=args.bare_key_package)
    except RelayError as exc:
        _emit(exc.to_body())
        return 1
    except OSError as exc:
        _emit({"error": "InputError", "message": f"{args.file}: {exc.strerror or exc}"})
        return 1
    _emit(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
