"""What a node agent issues a replica: a user of its function's own account, allowed only from
this host, with permissions bound to its function and itself; and that account, which imports
only its function's subjects from the Kiln account."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from kiln.invoker.credentials import ReplicaCredentials, host_addresses
from kiln.natsauth import Trust
from kiln.wire import Subjects


def claims_of(creds: str) -> dict[str, Any]:
    jwt = creds.split("-----BEGIN NATS USER JWT-----\n", 1)[1].split("\n", 1)[0]
    part = jwt.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return claims


async def _no_push(jwt: str) -> None:
    raise AssertionError("not pushed in this test")


def issuer_for(trust: Trust) -> ReplicaCredentials:
    return ReplicaCredentials(
        trust.signing_seed, operator_signing_seed=trust.operator_signing_seed,
        kiln_account=trust.account_public_key, subjects=Subjects("t"), node_id="n1",
        push=_no_push,
    )  # fmt: skip


def test_a_replicas_credentials_name_it_and_work_only_from_this_host() -> None:
    trust = Trust.generate()
    issuer = issuer_for(trust)
    function_id, replica_id = uuid.uuid4(), uuid.uuid4()
    claims = claims_of(issuer.issue(function_id=function_id, replica_id=replica_id))
    assert claims["name"] == f"replica-{replica_id.hex}"
    # Its function's account, the same on every node (derived from the signing key).
    assert claims["nats"]["issuer_account"] == issuer.account(function_id)
    assert issuer.account(function_id) == issuer_for(trust).account(function_id)
    assert issuer.account(function_id) != issuer.account(uuid.uuid4())
    assert claims["nats"]["issuer_account"] != trust.account_public_key
    assert claims["nats"]["src"] == list(host_addresses())
    assert "127.0.0.1/32" in claims["nats"]["src"]
    published = claims["nats"]["pub"]["allow"]
    assert f"t.hb.replica.{replica_id.hex}" in published
    assert f"$JS.API.CONSUMER.MSG.NEXT.t_calls.fn_{function_id.hex}" in published
    assert not [s for s in published if s.startswith("t.usage")]
    assert claims["nats"]["sub"]["allow"] == [
        f"_INBOX_{replica_id.hex}.>",
        f"t.replica.{replica_id.hex}.>",
    ]


def test_a_functions_account_imports_its_own_subjects_from_the_kiln_account_only() -> None:
    trust = Trust.generate()
    issuer = issuer_for(trust)
    function_id = uuid.uuid4()
    fn = function_id.hex
    jwt = issuer.account_jwt(function_id)
    part = jwt.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert claims["iss"] == trust.operator_signing_public_key
    assert claims["sub"] == issuer.account(function_id)
    assert claims["nats"]["signing_keys"] == [trust.signing_public_key]
    assert "jetstream" not in json.dumps(claims["nats"]["limits"])  # no JetStream of its own
    imports = {i["subject"]: (i["type"], i["account"]) for i in claims["nats"]["imports"]}
    assert {account for _, account in imports.values()} == {trust.account_public_key}
    assert imports["t.replica.>"][0] == "stream"
    assert imports[f"$JS.API.CONSUMER.MSG.NEXT.t_calls.fn_{fn}"][0] == "service"
    assert f"$JS.ACK.t_calls.fn_{fn}.>" in imports
    assert f"t.reply.*.{fn}.*.*" in imports
    # Its own function's queue and buckets only, and no JetStream API but direct gets.
    others = [s for s in imports if s.startswith("$") and fn not in s and "job_cancels" not in s]
    assert others == []
    assert not [s for s in imports if s.startswith(("$JS.API.STREAM", "$JS.API.CONSUMER.CREATE"))]


def test_a_function_has_an_account_per_namespace() -> None:
    trust = Trust.generate()
    function_id = uuid.uuid4()
    elsewhere = ReplicaCredentials(
        trust.signing_seed, operator_signing_seed=trust.operator_signing_seed,
        kiln_account=trust.account_public_key, subjects=Subjects("u"), node_id="n1",
        push=_no_push,
    )  # fmt: skip
    assert elsewhere.account(function_id) != issuer_for(trust).account(function_id)
