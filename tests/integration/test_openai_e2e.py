"""The OpenAI-compatible surface and the model catalog on the real, sandboxed stack (issue 22),
met through OpenAI's own Python client: catalog deployments of small local models (a chat model
and an embeddings model) and an app of the test's own that serves images through the SDK;
chat, completions and embeddings, plain and streamed; each refusal in OpenAI's error shape with
its param; a client that leaves stops generation; a function key sees only its model; a catalog
deployment scales to zero and answers again from its snapshot."""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import sqlalchemy as sa
from eventually import eventually
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform
from typer.testing import CliRunner, Result

from kiln.catalog.tiny import CHAT_CONTEXT, tiny_chat_model, tiny_embedding_model
from kiln.cli.main import app as cli
from kiln.db.models import Replica
from kiln.db.models_access import DEFAULT_CUSTOMER_ID
from kiln.settings import Settings

pytestmark = [pytest.mark.integration]

PAINTER = """
import struct
import zlib

import kiln

app = kiln.App("painter")


def png(width: int, height: int, shade: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\\x00" + bytes([shade]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@app.cls()
class Painter:
    @kiln.method(task="image")
    def paint(self, request: kiln.ImageRequest) -> kiln.Images:
        width, height = request.width_height
        return kiln.Images(png=[png(width, height, i * 40) for i in range(request.n)])
"""


@pytest.fixture(scope="module")
def models() -> Iterator[Path]:
    """The model folders, readable by the sandboxes' unprivileged users, as an operator makes a
    node's model folders (pytest's temporary folders are its user's alone; the builders open
    up their own)."""
    with tempfile.TemporaryDirectory(prefix="kiln-models-") as name:
        top = Path(name)
        tiny_chat_model(top / "chat")
        tiny_embedding_model(top / "embed")
        top.chmod(0o755)
        yield top


@pytest.fixture(scope="module")
def settings(settings: Settings, models: Path) -> Settings:
    """The session's settings, with the model folders shown to sandboxed replicas (as an
    operator lists a node's model folders in KILN_SANDBOX_SHARE)."""
    return settings.replace(sandbox_share=(models,))


@pytest.fixture(scope="module")
async def deployed(platform: Platform, models: Path) -> dict[str, Any]:
    async with platform.client() as client:
        chat = await client.post(
            "/v1/deployments",
            json={"catalog": "chat", "name": "tiny-chat", "model": str(models / "chat"),
                  "gpu": "none", "idle_timeout": 2},
        )  # fmt: skip
        assert chat.status_code == 201, chat.text
        embed = await client.post(
            "/v1/deployments",
            json={"catalog": "embeddings", "name": "tiny-embed", "model": str(models / "embed")},
        )
        assert embed.status_code == 201, embed.text
    await platform.deploy_source(models, "painter.py", PAINTER)
    return {"chat": chat.json(), "embed": embed.json()}


@pytest.fixture
async def oai(platform: Platform, deployed: dict[str, Any]) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=deployed["chat"]["base_url"], api_key=platform.key, max_retries=0, timeout=120
    ) as client:
        yield client


def greedy(**more: Any) -> dict[str, Any]:
    return {"temperature": 0, "seed": 7, **more}


MESSAGES: list[Any] = [{"role": "user", "content": "Say something."}]


async def test_the_catalog_lists_entries_with_prices_and_deploys_apps(
    platform: Platform, deployed: dict[str, Any]
) -> None:
    async with platform.client() as client:
        entries = (await client.get("/v1/catalog")).json()["data"]
        listed = (await client.get("/v1/deployments")).json()["data"]
        one = await client.get(f"/v1/deployments/{deployed['chat']['id']}")
        apps = (await client.get("/v1/apps")).json()["apps"]
    by_slug = {e["slug"]: e for e in entries}
    assert {"chat", "completions", "embeddings", "image"} <= set(by_slug)
    chat = by_slug["chat"]
    assert chat["task"] == "chat"
    assert chat["tasks"] == ["chat", "completions"]
    assert {"gpu": "H100", "price_per_hour_micros": 3_900_000} in chat["gpus"]
    assert "none" not in [g["gpu"] for g in chat["gpus"]]  # a language model wants a GPU
    assert by_slug["embeddings"]["gpus"][0] == {"gpu": "none", "price_per_hour_micros": 50_000}
    assert chat["example"]["route"] == "/v1/chat/completions"
    assert [d["name"] for d in listed] == ["tiny-chat", "tiny-embed"]  # not the painter app
    assert one.status_code == 200
    assert one.json()["served_model"].endswith("/chat")
    assert deployed["chat"]["base_url"] == platform.url + "/v1"
    assert {"tiny-chat", "tiny-embed", "painter"} <= {a["name"] for a in apps}


async def test_models_lists_the_callers_deployments_with_their_task(
    oai: openai.AsyncOpenAI,
) -> None:
    models = {m.id: m for m in (await oai.models.list()).data}
    assert set(models) == {"tiny-chat", "tiny-embed", "painter"}
    assert models["tiny-chat"].model_extra["tasks"] == ["chat", "completions"]  # type: ignore[index]
    assert models["tiny-embed"].model_extra["task"] == "embeddings"  # type: ignore[index]
    assert (await oai.models.retrieve("tiny-chat")).id == "tiny-chat"


async def test_chat_plain_and_streamed_with_usage_say_the_same(oai: openai.AsyncOpenAI) -> None:
    plain = await oai.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=12, **greedy()
    )
    choice = plain.choices[0]
    assert plain.object == "chat.completion"
    assert plain.model == "tiny-chat"
    assert choice.message.role == "assistant"
    assert len(choice.message.content or "") == 12
    assert choice.finish_reason == "length"
    assert plain.usage is not None
    assert plain.usage.completion_tokens == 12
    prompt = "<|user|>Say something.\n<|assistant|>"  # the model's chat template, applied
    assert plain.usage.prompt_tokens == len(prompt)  # one byte, one token
    assert plain.usage.total_tokens == len(prompt) + 12

    chunks = [
        c
        async for c in await oai.chat.completions.create(
            model="tiny-chat", messages=MESSAGES, max_completion_tokens=12, stream=True,
            stream_options={"include_usage": True}, **greedy(),
        )
    ]  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length"
    assert set(finals[:-1]) == {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage == plain.usage


async def test_a_stream_is_server_sent_events_ending_in_done(
    platform: Platform, deployed: dict[str, Any]
) -> None:
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    async with platform.client() as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


async def test_completions_echo_and_stop(oai: openai.AsyncOpenAI) -> None:
    plain = await oai.completions.create(model="tiny-chat", prompt="Once", max_tokens=8, **greedy())
    assert plain.object == "text_completion"
    assert len(plain.choices[0].text) == 8
    echoed = await oai.completions.create(
        model="tiny-chat", prompt="Once", max_tokens=8, echo=True, **greedy()
    )
    assert echoed.choices[0].text == "Once" + plain.choices[0].text
    stop = plain.choices[0].text[4]
    stopped = await oai.completions.create(
        model="tiny-chat", prompt="Once", max_tokens=8, stop=[stop], **greedy()
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == plain.choices[0].text.split(stop)[0]
    streamed = [
        c.choices[0].text
        async for c in await oai.completions.create(
            model="tiny-chat", prompt="Once", max_tokens=8, stream=True, **greedy()
        )
    ]
    assert "".join(streamed) == plain.choices[0].text


async def test_embeddings_as_floats_and_base64_with_dimensions(oai: openai.AsyncOpenAI) -> None:
    texts = ["the first text", "another one"]
    floats = await oai.embeddings.create(model="tiny-embed", input=texts, encoding_format="float")
    packed = await oai.embeddings.create(model="tiny-embed", input=texts)  # base64, by default
    assert [e.index for e in floats.data] == [0, 1]
    for a, b in zip(floats.data, packed.data, strict=True):
        assert len(a.embedding) == 64
        assert sum(x * x for x in a.embedding) == pytest.approx(1.0, abs=1e-4)
        assert b.embedding == pytest.approx(a.embedding, abs=1e-6)
    assert floats.usage.prompt_tokens == sum(len(t) + 2 for t in texts)  # bytes, [CLS], [SEP]
    short = await oai.embeddings.create(model="tiny-embed", input="the first text", dimensions=8)
    assert len(short.data[0].embedding) == 8
    assert sum(x * x for x in short.data[0].embedding) == pytest.approx(1.0, abs=1e-4)


async def test_images_from_a_method_of_the_developers_own(oai: openai.AsyncOpenAI) -> None:
    made = await oai.images.generate(
        model="painter", prompt="grey squares", n=2, size="64x64", response_format="b64_json"
    )
    images = [base64.b64decode(d.b64_json or "") for d in made.data or []]
    assert len(images) == 2
    assert all(i.startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert images[0] != images[1]


async def logged_call(platform: Platform, completion_id: str) -> dict[str, Any]:
    """The invocation log's row of a chat completion (its id is `chatcmpl-<request id>`),
    once the writer has written it."""
    request_id = completion_id.removeprefix("chatcmpl-")

    async def logged() -> dict[str, Any]:
        async with platform.client() as client:
            calls = (await client.get("/v1/functions/tiny-chat/Chat/calls")).json()["calls"]
        found = [c for c in calls if c["request_id"] == request_id]
        assert found, "not yet written"
        row: dict[str, Any] = found[0]
        return row

    row: dict[str, Any] = await eventually(
        logged, within_s=15, what="the call's row in the invocation log"
    )
    return row


def refusal(error: openai.APIStatusError) -> tuple[int, str | None, str]:
    body = error.body
    assert isinstance(body, dict)
    return error.status_code, body.get("param"), str(body.get("message"))


@pytest.mark.parametrize(
    ("route", "body", "status", "param", "words"),
    [
        ("chat", {"model": "nope", "messages": MESSAGES}, 404, "model",
         "The model 'nope' does not exist or you do not have access to it"),
        ("chat", {"model": "tiny-embed", "messages": MESSAGES}, 400, "model",
         "model 'tiny-embed' serves embeddings, not chat; call it at /v1/embeddings"),
        ("chat", {"model": "tiny-chat", "messages": [{"role": "robot", "content": "hi"}]}, 400,
         "messages[0].role", "messages[0].role='robot' is not valid"),
        ("chat", {"model": "tiny-chat", "messages": []}, 400, "messages",
         "messages must be a non-empty list"),
        ("chat", {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": CHAT_CONTEXT}, 400,
         "max_tokens", f"of this model's {CHAT_CONTEXT} context tokens"),
        ("chat", {"model": "tiny-chat", "messages": [{"role": "user", "content": "x" * 400}]},
         400, "messages", f"this model's context is {CHAT_CONTEXT} tokens"),
        ("chat", {"model": "tiny-chat", "messages": MESSAGES, "n": 2}, 400, "n",
         "n=2 is not supported"),
        ("chat", {"model": "tiny-chat", "messages": MESSAGES,
                  "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
         "tools are not supported"),
        ("embeddings", {"model": "tiny-embed", "input": []}, 400, "input",
         "input must be a string or a non-empty list of strings"),
        ("embeddings", {"model": "tiny-embed", "input": "x" * 100}, 400, "input", "tokens"),
        ("images", {"model": "tiny-chat", "prompt": "a cat", "response_format": "b64_json"},
         400, "model", "model 'tiny-chat' serves chat and completions, not image"),
        ("images", {"model": "painter", "prompt": "a cat", "response_format": "url"}, 400,
         "response_format", "deployments return images as b64_json"),
    ],
)  # fmt: skip
async def test_bad_requests_are_refused_in_openais_error_shape(
    platform: Platform,
    deployed: dict[str, Any],
    route: str,
    body: dict[str, Any],
    status: int,
    param: str,
    words: str,
) -> None:
    path = {
        "chat": "/v1/chat/completions",
        "embeddings": "/v1/embeddings",
        "images": "/v1/images/generations",
    }[route]
    async with platform.client() as client:
        response = await client.post(path, json=body)
    error = response.json()["error"]
    assert (response.status_code, error["param"]) == (status, param), error
    assert words in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status in (400, 404) else error["type"])


async def test_the_openai_client_raises_its_own_errors(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await oai.chat.completions.create(model="nope", messages=MESSAGES)
    assert refusal(missing.value)[:2] == (404, "model")
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=9999)
    assert refusal(bad.value)[:2] == (400, "max_tokens")


async def test_a_client_that_leaves_stops_generation_and_frees_the_slot(
    platform: Platform, deployed: dict[str, Any]
) -> None:
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 200, "stream": True}
    async with (
        platform.client() as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        lines = response.aiter_lines()
        async for line in lines:
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                break  # a first delta: the replica is generating

    async def slot_free() -> bool:
        replicas = await platform.ready_replicas("tiny-chat/Chat")
        assert replicas, "no ready replica"
        assert all(r["in_flight"] == 0 for r in replicas), replicas
        return True

    await eventually(slot_free, within_s=10, what="the replica's slot to be free")

    async def recorded() -> dict[str, Any]:
        async with platform.client() as client:
            calls = (await client.get("/v1/functions/tiny-chat/Chat/calls")).json()["calls"]
        cancelled = [c for c in calls if c["status"] == "cancelled"]
        assert cancelled, [c["status"] for c in calls]
        row: dict[str, Any] = cancelled[0]
        return row

    call = await eventually(recorded, within_s=15, what="the cancelled call in the log")
    assert call["kind"] == "stream"
    assert call["method"] == "chat"


async def test_token_counts_reach_the_invocation_log(
    oai: openai.AsyncOpenAI, platform: Platform
) -> None:
    done = await oai.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=5, **greedy()
    )
    assert done.usage is not None

    row = await logged_call(platform, done.id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (done.usage.prompt_tokens, 5)


async def test_a_function_key_reaches_only_its_own_model(
    platform: Platform, deployed: dict[str, Any]
) -> None:
    async with platform.client() as client:
        made = await client.post(
            "/v1/keys",
            json={"kind": "function", "function": "tiny-embed/Embeddings",
                  "customer_id": str(DEFAULT_CUSTOMER_ID)},
        )  # fmt: skip
    assert made.status_code == 201, made.text
    async with openai.AsyncOpenAI(
        base_url=deployed["chat"]["base_url"], api_key=made.json()["key"], max_retries=0
    ) as scoped:
        assert [m.id for m in (await scoped.models.list()).data] == ["tiny-embed"]
        assert (await scoped.embeddings.create(model="tiny-embed", input="hi")).data
        with pytest.raises(openai.NotFoundError):
            await scoped.chat.completions.create(model="tiny-chat", messages=MESSAGES)


async def test_a_catalog_deployment_scales_to_zero_and_answers_from_its_snapshot(
    oai: openai.AsyncOpenAI, platform: Platform, engine: AsyncEngine
) -> None:
    await oai.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2)
    await eventually(
        lambda: platform.scaled_to_zero("tiny-chat/Chat"), within_s=60, what="scale to zero"
    )
    answered = await oai.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=4, **greedy()
    )
    assert len(answered.choices[0].message.content or "") == 4

    row = await logged_call(platform, answered.id)
    assert row["cold_start"] is True
    async with engine.connect() as conn:
        origin = await conn.scalar(
            sa.select(Replica.origin).where(Replica.id == uuid.UUID(row["replica_id"]))
        )
    assert origin == "snapshot"


async def test_catalog_deployments_are_apps_removed_over_http(platform: Platform) -> None:
    async with platform.client() as client:
        made = await client.post(
            "/v1/deployments",
            json={"catalog": "embeddings", "name": "short-lived", "model": "/nowhere"},
        )
        assert made.status_code == 201, made.text
        again = await client.post(
            "/v1/deployments",
            json={"catalog": "embeddings", "name": "short-lived", "model": "/nowhere"},
        )
        assert again.status_code == 200
        assert again.json()["id"] == made.json()["id"]
        unknown = await client.post("/v1/deployments", json={"catalog": "llama", "name": "x"})
        gone = await client.delete(f"/v1/deployments/{made.json()['id']}")
        after = await client.get(f"/v1/deployments/{made.json()['id']}")
    assert unknown.status_code == 404
    assert "the catalog has no entry 'llama'; its entries are chat" in unknown.text
    assert gone.status_code == 204
    assert after.status_code == 404


async def test_requests_in_flight_at_once_all_stream(oai: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> str:
        done = await oai.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": f"n{i}"}], max_tokens=6
        )
        return done.choices[0].message.content or ""

    answers = await asyncio.gather(*(one(i) for i in range(4)))
    assert all(len(a) == 6 for a in answers)


async def test_another_customer_pays_first_and_never_reaches_these_models(
    platform: Platform, deployed: dict[str, Any]
) -> None:
    async with platform.client() as operator:
        customer = (await operator.post("/v1/customers", json={"name": "Other"})).json()
        made = await operator.post(
            "/v1/keys", json={"kind": "account", "customer_id": customer["id"]}
        )
    assert made.status_code == 201, made.text
    async with openai.AsyncOpenAI(
        base_url=deployed["chat"]["base_url"], api_key=made.json()["key"], max_retries=0
    ) as other:
        with pytest.raises(openai.APIStatusError) as unpaid:
            await other.chat.completions.create(model="tiny-chat", messages=MESSAGES)
        assert unpaid.value.status_code == 402
        assert isinstance(unpaid.value.body, dict)
        assert unpaid.value.body["type"] == "insufficient_quota"
        async with platform.client() as operator:
            paid = await operator.post(
                "/v1/billing/credits",
                json={"customer_id": customer["id"], "amount_micros": 10**8},
            )
        assert paid.status_code == 201, paid.text

        async def refused_as_unknown() -> bool:
            with pytest.raises(openai.NotFoundError) as missing:
                await other.chat.completions.create(model="tiny-chat", messages=MESSAGES)
            assert refusal(missing.value)[:2] == (404, "model")
            return True

        await eventually(refused_as_unknown, within_s=10, what="the paid customer's 404")
        assert (await other.models.list()).data == []


async def test_kiln_catalog_lists_and_deploys_and_the_app_is_an_app(
    platform: Platform, models: Path, tmp_path: Path
) -> None:
    env = {"KILN_URL": platform.url, "KILN_API_KEY": platform.key, "KILN_HOME": str(tmp_path)}

    def kiln_cli(*args: str) -> Result:
        # In a thread: the CLI's client blocks, and the platform serves on this event loop.
        return CliRunner().invoke(cli, list(args), env=env)

    listed = await asyncio.to_thread(kiln_cli, "catalog", "list")
    assert listed.exit_code == 0, listed.output
    header, *rows = listed.output.splitlines()
    assert header.split() == ["SLUG", "TASKS", "DEFAULT", "MODEL", "GPUS", "PRICE"]
    embeddings = next(r for r in rows if r.startswith("embeddings "))
    assert "sentence-transformers/all-MiniLM-L6-v2" in embeddings
    assert embeddings.endswith("from 0.05 usd/h")
    deployed = await asyncio.to_thread(
        kiln_cli, "catalog", "deploy", "embeddings", "--name", "cli-embed",
        "--model", str(models / "embed"), "--max", "1", "--idle-timeout", "30",
    )  # fmt: skip
    assert deployed.exit_code == 0, deployed.output
    assert deployed.output.splitlines()[1:3] == [
        f"  base_url: {platform.url}/v1",
        "  model:    cli-embed",
    ]
    ps = await asyncio.to_thread(kiln_cli, "ps", "--json")
    (function,) = [f for f in json.loads(ps.output) if f["app"] == "cli-embed"]
    assert (function["name"], function["max_replicas"], function["idle_timeout"]) == (
        "Embeddings", 1, 30,
    )  # fmt: skip
    stopped = await asyncio.to_thread(kiln_cli, "stop", "cli-embed")
    assert stopped.exit_code == 0, stopped.output
    async with platform.client() as client:
        names = [d["name"] for d in (await client.get("/v1/deployments")).json()["data"]]
    assert "cli-embed" not in names
