"""Passive-client and interop vectors: KeyPackages, Welcomes and the commit chains."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from protocol.mls import (
    ContentType,
    LeafNodeSource,
    MLSMessage,
    PrivateMessage,
    PublicMessage,
    SenderType,
    Welcome,
    WireFormat,
    encode_mls_message,
    key_package_ref,
    parse_key_package,
    parse_mls_message,
    validate_key_package,
    verify_key_package,
    verify_leaf_node,
)
from protocol.mls.group import read_ratchet_tree, write_ratchet_tree
from protocol.mls.tls import decode_exact, encode_with
from tests.vectorfiles import vector_path

PASSIVE_FILES = [
    "mlswg/interop-passive-external_join.json",
    "mlswg-subsets/passive-client-welcome.cs1-3.json",
    "mlswg-subsets/passive-client-handling-commit.cs1-3.json",
    "mlswg-subsets/passive-client-random.first-50-epochs.json",
    "mlswg-subsets/interop-passive-commit.cs1-3-with-epochs.json",
    "mlswg-subsets/interop-passive-external_proposals.cs1-3-with-epochs.json",
]
COMMIT_FORMATS = {WireFormat.PUBLIC_MESSAGE, WireFormat.PRIVATE_MESSAGE}


def load(name: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(vector_path(name).read_text())
    return entries


def parse(hex_value: str) -> MLSMessage:
    data = bytes.fromhex(hex_value)
    msg = parse_mls_message(data)
    assert encode_mls_message(msg) == data
    return msg


@pytest.mark.parametrize("name", PASSIVE_FILES)
def test_key_package_parses_verifies_and_is_welcomed(name: str) -> None:
    entries = load(name)
    assert entries
    for i, entry in enumerate(entries):
        kp = parse_key_package(bytes.fromhex(entry["key_package"]), bare=False)
        assert kp.cipher_suite == entry["cipher_suite"], i
        assert kp.leaf_node.leaf_node_source is LeafNodeSource.KEY_PACKAGE
        assert verify_key_package(kp), i
        # Accepted by the relay's checks; oddities (GREASE, ...) are only warnings.
        validate_key_package(kp)
        welcome = parse_mls_message(bytes.fromhex(entry["welcome"]), expect=WireFormat.WELCOME)
        assert isinstance(welcome.body, Welcome)
        assert welcome.body.cipher_suite == kp.cipher_suite
        assert key_package_ref(kp) in welcome.body.new_members, i


#: The files whose entries hold commits (passive-client-welcome's hold none).
CHAIN_FILES = [name for name in PASSIVE_FILES if "passive-client-welcome" not in name]


@pytest.mark.parametrize("name", CHAIN_FILES)
def test_commit_chain_same_group_epochs_rise_by_one(name: str) -> None:
    commits = 0
    for i, entry in enumerate(load(name)):
        group_ids: set[bytes] = set()
        epochs: list[int] = []
        for epoch in entry["epochs"]:
            commit = parse(epoch["commit"])
            assert commit.wire_format in COMMIT_FORMATS
            assert commit.content_type is ContentType.COMMIT, i
            assert commit.group_id is not None and commit.epoch is not None
            group_ids.add(commit.group_id)
            epochs.append(commit.epoch)
            for proposal_hex in epoch["proposals"]:
                proposal = parse(proposal_hex)
                assert proposal.content_type is ContentType.PROPOSAL
                assert proposal.group_id == commit.group_id
                assert proposal.epoch == commit.epoch
        assert len(group_ids) == (1 if epochs else 0), i
        assert all(later == earlier + 1 for earlier, later in itertools.pairwise(epochs)), i
        commits += len(epochs)
    assert commits >= len(load(name)) // 2  # the checks ran (an entry has 0 to 50 commits)


def test_external_join_commits_are_new_member_commits() -> None:
    entries = load("mlswg/interop-passive-external_join.json")
    assert sorted({e["cipher_suite"] for e in entries}) == list(range(1, 8))
    commits = [parse(ep["commit"]) for e in entries for ep in e["epochs"]]
    assert commits
    for msg in commits:
        assert isinstance(msg.body, PublicMessage)
        assert msg.body.sender.sender_type is SenderType.NEW_MEMBER_COMMIT
        assert msg.body.sender.index is None
        assert msg.body.membership_tag is None  # only member senders carry one
        commit = msg.body.content.commit
        assert commit is not None and commit.path is not None  # external commits need a path


def test_external_proposals_come_from_external_senders() -> None:
    entries = load("mlswg-subsets/interop-passive-external_proposals.cs1-3-with-epochs.json")
    external = 0
    for entry in entries:
        for epoch in entry["epochs"]:
            for proposal_hex in epoch["proposals"]:
                body = parse(proposal_hex).body
                if isinstance(body, PrivateMessage):
                    continue  # sender is encrypted
                assert isinstance(body, PublicMessage)
                sender = body.sender
                assert sender.sender_type in (SenderType.MEMBER, SenderType.EXTERNAL)
                if sender.sender_type is SenderType.EXTERNAL:
                    external += 1
                    assert sender.sender_index is not None and sender.leaf_index is None
                    assert body.membership_tag is None
    assert external > 0


def test_passive_welcome_ratchet_trees_roundtrip() -> None:
    trees = 0
    for entry in load("mlswg-subsets/passive-client-welcome.cs1-3.json"):
        if entry["ratchet_tree"] is None:
            continue
        data = bytes.fromhex(entry["ratchet_tree"])
        tree = decode_exact(data, read_ratchet_tree, "ratchet_tree")
        assert encode_with(write_ratchet_tree, tree) == data
        leaves = [n.leaf_node for n in tree if n is not None and n.leaf_node is not None]
        assert leaves
        for leaf in leaves:
            # key_package leaves sign without group context: check them
            if leaf.leaf_node_source is LeafNodeSource.KEY_PACKAGE:
                assert verify_leaf_node(leaf, entry["cipher_suite"])
        trees += 1
    assert trees > 0


def test_commit_path_leaf_nodes_verify_with_group_context() -> None:
    """Commit-source LeafNodes sign group_id and the committer's leaf_index (§7.2)."""
    verified = 0
    for name in PASSIVE_FILES:
        for entry in load(name):
            for epoch in entry["epochs"]:
                body = parse(epoch["commit"]).body
                if not isinstance(body, PublicMessage) or body.sender.leaf_index is None:
                    continue
                commit = body.content.commit
                assert commit is not None
                if commit.path is None:
                    continue
                leaf = commit.path.leaf_node
                assert leaf.leaf_node_source is LeafNodeSource.COMMIT
                suite = entry["cipher_suite"]
                index = body.sender.leaf_index
                assert verify_leaf_node(leaf, suite, body.group_id, index)
                assert not verify_leaf_node(leaf, suite, body.group_id, index + 1)
                verified += 1
    assert verified > 50
