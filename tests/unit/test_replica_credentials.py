"""What a node agent issues a replica: a user of the platform's account, allowed only from this
host, with permissions bound to its function and itself."""

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


def test_a_replicas_credentials_name_it_and_work_only_from_this_host() -> None:
    trust = Trust.generate()
    issuer = ReplicaCredentials(
        trust.signing_seed, account=trust.account_public_key, subjects=Subjects("t"),
        node_id="n1",
    )  # fmt: skip
    function_id, replica_id = uuid.uuid4(), uuid.uuid4()
    claims = claims_of(issuer.issue(function_id=function_id, replica_id=replica_id))
    assert claims["name"] == f"replica-{replica_id.hex}"
    assert claims["nats"]["issuer_account"] == trust.account_public_key
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
