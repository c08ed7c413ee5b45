"""The catalog's engines in this process, on tiny random models built on the spot
(`tests/models.py`): each engine subclass is made the way a catalog app makes it, its hooks are
run as a replica runs them, and its task methods are called directly.

The chat model writes one printable character per token and never ends by itself, so a reply's
text, its length in tokens and where a stop sequence falls are all known from a plain greedy
`model.generate()` of the same prompt.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from eventually import eventually

import kiln
from kiln.catalog._sampling import Detokenizer, Penalties, Sampler, StopScanner
from kiln.catalog.embeddings import TransformersEmbeddings
from kiln.catalog.image import DiffusersImage
from kiln.catalog.text import TransformersText
from kiln.catalog.tiny import EMBEDDING_MAX_LENGTH, tiny_chat_model, tiny_embedding_model
from kiln.functions.hooks import lifecycle
from kiln.snapshots.capture import capture, rebuild

HELLO = (kiln.Message(role="user", content="hi"),)
# What the tiny model's template makes of HELLO: every byte is a token.
HELLO_PROMPT = "<|user|>hi\n<|assistant|>"


def engine_class(base: type[Any], model_id: Path, **attributes: Any) -> type[Any]:
    """The engine subclass a catalog app would deploy, registered with an app as it would be."""
    cls = type("Engine", (base,), {"model_id": str(model_id), **attributes})
    kiln.App("catalog-test").cls(gpu="none")(cls)  # Kiln's checks of the class's methods
    return cls


def loaded(cls: type[Any]) -> Any:
    """An instance whose snap hooks have run (what a snapshot holds)."""
    engine = cls()
    for name in lifecycle(cls).enter_snap:
        getattr(engine, name)()
    return engine


def started(engine: Any) -> Any:
    for name in lifecycle(type(engine)).enter:
        getattr(engine, name)()
    return engine


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def chat(chat_dir: Path) -> TransformersText:
    engine: TransformersText = started(loaded(engine_class(TransformersText, chat_dir)))
    return engine


def greedy(engine: TransformersText, prompt: str, tokens: int, *, special: bool = False) -> str:
    """The model's greedy continuation of `prompt`, from a plain `generate()`."""
    ids = engine.tokenizer(prompt, add_special_tokens=special, return_tensors="pt")
    with torch.inference_mode():
        out = engine.model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    text: str = engine.tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    return text


def run(stream: Iterator[str | kiln.Finish]) -> tuple[list[str], kiln.Finish]:
    *deltas, finish = list(stream)
    assert all(isinstance(delta, str) and delta for delta in deltas)
    assert isinstance(finish, kiln.Finish)
    return [str(delta) for delta in deltas], finish


def chat_request(**options: Any) -> kiln.ChatRequest:
    return kiln.ChatRequest(messages=options.pop("messages", HELLO), temperature=0, **options)


# Text: streaming and counting -------------------------------------------------------------------


def test_the_engine_modules_import_no_model_library() -> None:
    code = (
        "import sys\n"
        "import kiln.catalog.text, kiln.catalog.embeddings, kiln.catalog.image\n"
        "heavy = {'torch', 'transformers', 'diffusers', 'vllm'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_chat_streams_the_greedy_reply_to_the_templated_messages(chat: TransformersText) -> None:
    deltas, finish = run(chat.chat(chat_request(max_tokens=30)))

    assert "".join(deltas) == greedy(chat, HELLO_PROMPT, 30)
    assert len(deltas) == 30  # one character per token, each sent as it came
    assert finish == kiln.Finish(
        reason="length", prompt_tokens=len(HELLO_PROMPT), completion_tokens=30
    )


def test_a_tokenizer_without_a_chat_template_gets_role_lines(
    chat: TransformersText, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat.tokenizer, "chat_template", None)
    deltas, finish = run(chat.chat(chat_request(max_tokens=10)))

    assert "".join(deltas) == greedy(chat, "user: hi\nassistant:", 10)
    assert finish.prompt_tokens == len("user: hi\nassistant:")


def test_completions_echo_the_prompt_then_continue_it(chat: TransformersText) -> None:
    request = kiln.CompletionRequest(prompt="Once upon", echo=True, max_tokens=12, temperature=0)
    deltas, finish = run(chat.complete(request))

    assert deltas[0] == "Once upon"
    assert "".join(deltas[1:]) == greedy(chat, "Once upon", 12, special=True)
    assert finish == kiln.Finish(reason="length", prompt_tokens=9, completion_tokens=12)


def test_without_max_tokens_the_reply_runs_to_the_end_of_the_context(
    chat: TransformersText,
) -> None:
    deltas, finish = run(chat.chat(chat_request()))

    assert finish == kiln.Finish(
        reason="length",
        prompt_tokens=len(HELLO_PROMPT),
        completion_tokens=chat.context - len(HELLO_PROMPT),
    )
    assert len("".join(deltas)) == finish.completion_tokens


def test_an_end_of_sequence_token_finishes_with_stop(
    chat: TransformersText, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = greedy(chat, HELLO_PROMPT, 30)
    # Make the sixth character the model writes its end-of-sequence token.
    [token] = chat.tokenizer(reference[5], add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(chat, "eos", [token])
    end = reference.index(reference[5]) + 1

    deltas, finish = run(chat.chat(chat_request(max_tokens=30)))

    assert "".join(deltas) == reference[:end]
    assert finish == kiln.Finish(
        reason="stop", prompt_tokens=len(HELLO_PROMPT), completion_tokens=end
    )


def test_a_stop_sequence_ends_the_text_before_it(chat: TransformersText) -> None:
    reference = greedy(chat, HELLO_PROMPT, 40)
    stop = reference[20:23]
    at = reference.index(stop)

    deltas, finish = run(chat.chat(chat_request(max_tokens=40, stop=("never written", stop))))

    assert "".join(deltas) == reference[:at]
    # Every token up to the one that completed the stop sequence was generated.
    assert finish == kiln.Finish(
        reason="stop", prompt_tokens=len(HELLO_PROMPT), completion_tokens=at + len(stop)
    )


def test_the_stop_scanner_holds_back_what_may_start_a_stop_sequence() -> None:
    stops = StopScanner(["abc", "xyz"])

    assert stops.feed("12a") == "12"
    assert stops.feed("b") == ""
    assert stops.feed("d x") == "abd "
    assert stops.feed("yz tail") == ""
    assert stops.hit
    assert stops.feed("more") == ""

    unfinished = StopScanner(["abc"])
    assert unfinished.feed("xab") == "x"
    assert unfinished.flush() == "ab"
    assert not unfinished.hit


def test_the_detokenizer_waits_for_whole_characters(chat: TransformersText) -> None:
    text = "héllo → 世界"
    ids = chat.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters span several tokens

    detokenizer = Detokenizer(chat.tokenizer)
    pieces = [detokenizer.feed(token) for token in ids] + [detokenizer.flush()]

    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


# Text: refusals --------------------------------------------------------------------------------


def test_messages_that_fill_the_context_are_refused(chat: TransformersText) -> None:
    messages = (kiln.Message(role="user", content="x" * 300),)
    with pytest.raises(kiln.InvalidArguments) as refused:
        next(chat.chat(chat_request(messages=messages)))

    assert str(refused.value) == (
        "the messages are 322 tokens long, but this model's context is 256 tokens and must keep "
        "room for at least one new token; shorten the messages."
    )
    assert refused.value.fields == {"param": "messages"}


def test_a_prompt_that_fills_the_context_is_refused(chat: TransformersText) -> None:
    with pytest.raises(kiln.InvalidArguments) as refused:
        next(chat.complete(kiln.CompletionRequest(prompt="x" * 256)))

    assert str(refused.value) == (
        "the prompt is 256 tokens long, but this model's context is 256 tokens and must keep "
        "room for at least one new token; shorten the prompt."
    )
    assert refused.value.fields == {"param": "prompt"}


def test_messages_the_chat_template_refuses_are_refused(
    chat: TransformersText, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        chat.tokenizer,
        "chat_template",
        "{% if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('the first message must be the system prompt') }}{% endif %}",
    )
    with pytest.raises(kiln.InvalidArguments) as refused:
        next(chat.chat(chat_request()))

    assert str(refused.value) == (
        "this model's chat template does not accept the messages: the first message must be "
        "the system prompt"
    )
    assert refused.value.fields == {"param": "messages"}


def test_max_tokens_beyond_the_context_is_refused(chat: TransformersText) -> None:
    with pytest.raises(kiln.InvalidArguments) as refused:
        next(chat.complete(kiln.CompletionRequest(prompt="x" * 200, max_tokens=57)))

    assert str(refused.value) == (
        "max_tokens=57 does not fit: the prompt takes 200 of this model's 256 context tokens, "
        "so at most 56 new tokens fit; lower max_tokens or shorten the prompt."
    )
    assert refused.value.fields == {"param": "max_tokens"}

    with pytest.raises(kiln.InvalidArguments) as refused:
        next(chat.chat(chat_request(max_tokens=1000)))
    assert str(refused.value) == (
        f"max_tokens=1000 does not fit: the messages take {len(HELLO_PROMPT)} of this model's "
        f"256 context tokens, so at most {256 - len(HELLO_PROMPT)} new tokens fit; lower "
        "max_tokens or shorten the messages."
    )

    # The largest that fits is taken.
    _, finish = run(chat.complete(kiln.CompletionRequest(prompt="x" * 200, max_tokens=56)))
    assert finish.completion_tokens == 56


# Text: cancellation and errors -----------------------------------------------------------------


def test_closing_the_stream_stops_generation_after_the_step_in_progress(
    chat: TransformersText,
) -> None:
    """The replica closes a stream whose caller went away: generation must not run on."""
    forward = chat.model.forward
    steps = 0
    blocked, resume = threading.Event(), threading.Event()

    @functools.wraps(forward)
    def gated(*args: Any, **kwargs: Any) -> Any:
        nonlocal steps
        steps += 1
        if steps == 4:  # hold the fourth decoding step until the stream is being closed
            blocked.set()
            resume.wait(30)
        return forward(*args, **kwargs)

    chat.model.forward = gated
    try:
        stream = chat.chat(chat_request())  # no max_tokens: it would run to the context's end
        assert isinstance(next(stream), str)
        assert blocked.wait(30)
        [generation] = chat.generations
        closer = threading.Thread(target=stream.close)
        closer.start()
        asyncio.run(eventually(generation.cancel.event.is_set, within_s=10))
        resume.set()
        closer.join(30)

        assert not closer.is_alive()
        assert steps == 4  # the step in progress finished, and no other began
        assert not generation.running
        assert chat.generations == set()
    finally:
        resume.set()
        del chat.model.forward


def test_an_error_in_generation_reaches_the_caller(chat: TransformersText) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the device fell over")

    chat.model.forward = broken
    try:
        with pytest.raises(RuntimeError, match="the device fell over"):
            list(chat.chat(chat_request(max_tokens=5)))
    finally:
        del chat.model.forward
    assert chat.generations == set()


# Text: sampling --------------------------------------------------------------------------------


def test_a_seed_makes_sampling_reproducible_even_among_concurrent_streams(
    chat: TransformersText,
) -> None:
    def sampled(seed: int) -> kiln.ChatRequest:
        return kiln.ChatRequest(messages=HELLO, temperature=1.5, seed=seed, max_tokens=40)

    alone, _ = run(chat.chat(sampled(7)))
    assert run(chat.chat(sampled(7)))[0] == alone
    assert run(chat.chat(sampled(8)))[0] != alone

    # Two streams stepped in turn, one seeded like `alone`: their draws do not mix.
    first, second = chat.chat(sampled(7)), chat.chat(sampled(9))
    interleaved: list[str | kiln.Finish] = []
    for item, _ in zip(first, second, strict=True):
        interleaved.append(item)
    assert interleaved[:-1] == alone


def test_penalties_subtract_from_the_logits_of_generated_tokens() -> None:
    penalties = Penalties(prompt_length=2, presence=0.5, frequency=0.25)
    input_ids = torch.tensor([[3, 3, 5, 5, 7]])  # the prompt is [3, 3]

    scores = penalties(input_ids, torch.zeros(1, 8))

    expected = torch.zeros(1, 8)
    expected[0, 5] = -(0.5 + 2 * 0.25)
    expected[0, 7] = -(0.5 + 1 * 0.25)
    assert torch.equal(scores, expected)
    assert torch.equal(penalties(input_ids[:, :2], torch.zeros(1, 8)), torch.zeros(1, 8))


def test_a_frequency_penalty_keeps_greedy_text_from_repeating(chat: TransformersText) -> None:
    plain, _ = run(chat.chat(chat_request(max_tokens=40)))
    assert len(set(plain)) < len(plain)  # it repeats characters unpenalised

    penalised, _ = run(chat.chat(chat_request(max_tokens=40, frequency_penalty=100.0)))
    assert len(set(penalised)) == len(penalised)


def test_the_sampler_leaves_one_token_and_top_p_narrows_the_choice() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    narrow = Sampler(temperature=1.0, top_p=0.01, seed=None, device=torch.device("cpu"))

    chosen = narrow(torch.tensor([[0]]), scores)

    assert torch.equal(chosen, torch.tensor([[-float("inf"), 0.0, -float("inf"), -float("inf")]]))


# Text: snapshots -------------------------------------------------------------------------------


def restored(cls: type[Any]) -> Any:
    """A started instance whose snap state went through a snapshot's capture and rebuild (in
    memory): what a replica restored from a snapshot holds."""
    captured = capture(dict(vars(loaded(cls))))
    storages = {slot.name: slot.storage for slot in captured.storages}

    class InPlace:
        def device(self, kind: str) -> torch.device:
            return torch.device(kind)

        def storage(self, kind: str, name: str) -> torch.UntypedStorage:
            return storages[name]

    engine = cls()
    vars(engine).update(rebuild(captured.graph, InPlace()))
    return started(engine)


def test_a_text_engine_restored_from_a_snapshot_serves(chat: TransformersText) -> None:
    request = chat_request(max_tokens=20)
    assert run(restored(type(chat)).chat(request)) == run(chat.chat(request))


# Embeddings ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_embedding_model(tmp_path_factory.mktemp("embeddings"))


@pytest.fixture(scope="module")
async def embeddings(embedding_dir: Path) -> AsyncIterator[TransformersEmbeddings]:
    engine: TransformersEmbeddings = started(
        loaded(engine_class(TransformersEmbeddings, embedding_dir))
    )
    yield engine
    await engine.stop()


def norm(vector: list[float]) -> float:
    return float(torch.tensor(vector).norm())


async def test_embeddings_are_normalised_means_with_their_token_count(
    embeddings: TransformersEmbeddings,
) -> None:
    texts = ("the first text", "a second, longer text")
    result = await embeddings.embed(kiln.EmbeddingsRequest(input=texts))

    assert [len(vector) for vector in result.vectors] == [64, 64]
    assert all(norm(list(vector)) == pytest.approx(1.0) for vector in result.vectors)
    # One token per byte, and [CLS] and [SEP] around each text.
    assert result.prompt_tokens == sum(len(text) + 2 for text in texts)

    ids = embeddings.tokenizer(list(texts[:1]), return_tensors="pt")
    with torch.inference_mode():
        states = embeddings.model(**ids).last_hidden_state
    mean = torch.nn.functional.normalize(states.mean(dim=1), dim=-1)[0]
    assert torch.allclose(torch.tensor(result.vectors[0]), mean, atol=1e-5)


async def test_dimensions_keep_the_first_components_renormalised(
    embeddings: TransformersEmbeddings,
) -> None:
    request = kiln.EmbeddingsRequest(input=("shorter vectors",))
    [full] = (await embeddings.embed(request)).vectors
    [short] = (
        await embeddings.embed(kiln.EmbeddingsRequest(input=request.input, dimensions=8))
    ).vectors

    assert len(short) == 8
    expected = torch.nn.functional.normalize(torch.tensor(full[:8]), dim=0)
    assert torch.allclose(torch.tensor(short), expected, atol=1e-6)

    for wrong in (0, 65):
        with pytest.raises(kiln.InvalidArguments) as refused:
            await embeddings.embed(kiln.EmbeddingsRequest(input=("x",), dimensions=wrong))
        assert str(refused.value) == (
            f"dimensions={wrong} is not valid for this model: its vectors have 64 dimensions, "
            "so ask for 1 to 64."
        )
        assert refused.value.fields == {"param": "dimensions"}


async def test_concurrent_requests_share_forward_passes(
    embeddings: TransformersEmbeddings,
) -> None:
    requests = [
        kiln.EmbeddingsRequest(input=tuple(f"text {i}.{j}" + " word" * i for j in range(i % 3 + 1)))
        for i in range(8)
    ]
    alone = [await embeddings.embed(request) for request in requests]
    before = embeddings.batches

    together = await asyncio.gather(*(embeddings.embed(request) for request in requests))

    assert embeddings.batches - before == 1
    for solo, shared in zip(alone, together, strict=True):
        assert shared.prompt_tokens == solo.prompt_tokens
        assert torch.allclose(torch.tensor(shared.vectors), torch.tensor(solo.vectors), atol=1e-5)


async def test_an_input_too_long_fails_only_its_own_request(
    embeddings: TransformersEmbeddings,
) -> None:
    too_long = "x" * (EMBEDDING_MAX_LENGTH - 1)  # with [CLS] and [SEP], one token too many
    good = kiln.EmbeddingsRequest(input=("fine",))
    solo = await embeddings.embed(good)

    results = await asyncio.gather(
        embeddings.embed(good),
        embeddings.embed(kiln.EmbeddingsRequest(input=("fine", too_long))),
        embeddings.embed(good),
        return_exceptions=True,
    )

    refused = results[1]
    assert isinstance(refused, kiln.InvalidArguments)
    assert str(refused) == (
        f"input[1] is {EMBEDDING_MAX_LENGTH + 1} tokens long, but this model reads at most "
        f"{EMBEDDING_MAX_LENGTH} tokens per input; shorten or split it."
    )
    assert refused.fields == {"param": "input"}
    for shared in (results[0], results[2]):
        assert isinstance(shared, kiln.Embeddings)
        assert shared.prompt_tokens == solo.prompt_tokens
        assert torch.allclose(torch.tensor(shared.vectors), torch.tensor(solo.vectors), atol=1e-5)


async def test_an_empty_input_is_refused(embeddings: TransformersEmbeddings) -> None:
    with pytest.raises(kiln.InvalidArguments) as refused:
        await embeddings.embed(kiln.EmbeddingsRequest(input=("text", "")))

    assert str(refused.value) == "input[1] is empty: there is nothing to embed."
    assert refused.value.fields == {"param": "input"}


async def test_an_embeddings_engine_restored_from_a_snapshot_serves(
    embeddings: TransformersEmbeddings,
) -> None:
    request = kiln.EmbeddingsRequest(input=("restored",))
    engine = restored(type(embeddings))
    try:
        assert await engine.embed(request) == await embeddings.embed(request)
    finally:
        await engine.stop()


def test_a_sentence_transformers_model_reads_what_it_was_trained_for(
    embedding_dir: Path, tmp_path: Path
) -> None:
    directory = shutil.copytree(embedding_dir, tmp_path / "trained-for-16")
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))

    assert loaded(engine_class(TransformersEmbeddings, directory)).max_length == 16


# Images ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> DiffusersImage:
    pytest.importorskip("diffusers", reason="the image engine needs diffusers")
    from kiln.catalog.tiny import tiny_image_pipeline

    directory = tiny_image_pipeline(tmp_path_factory.mktemp("image"))
    engine: DiffusersImage = started(
        loaded(engine_class(DiffusersImage, directory, default_steps=2))
    )
    return engine


def test_images_come_back_as_pngs_of_the_size_asked_for(image: DiffusersImage) -> None:
    from PIL import Image

    request = kiln.ImageRequest(prompt="a lighthouse", n=2, size="32x16", seed=3)
    result = image.generate(request)

    pictures = [Image.open(io.BytesIO(png)) for png in result.png]
    assert [(p.format, p.size) for p in pictures] == [("PNG", (32, 16))] * 2

    def seeded(seed: int) -> bytes:
        request = kiln.ImageRequest(prompt="a lighthouse", size="32x16", seed=seed)
        [png] = image.generate(request).png
        return bytes(png)

    assert seeded(5) == seeded(5)


def test_an_image_engine_restored_from_a_snapshot_serves(image: DiffusersImage) -> None:
    request = kiln.ImageRequest(prompt="a lighthouse", size="16x16", seed=1)
    assert restored(type(image)).generate(request) == image.generate(request)


def test_a_size_the_pipeline_cannot_make_is_refused(image: DiffusersImage) -> None:
    for size, message in [
        (
            "33x16",
            "size='33x16' is not a size this model can make: its width and height must be "
            "multiples of 2 pixels (such as '32x16').",
        ),
        (
            "large",
            "size='large' is not valid: write it as WIDTHxHEIGHT in pixels, such as '512x512'.",
        ),
    ]:
        with pytest.raises(kiln.InvalidArguments) as refused:
            image.generate(kiln.ImageRequest(prompt="x", size=size))
        assert str(refused.value) == message
        assert refused.value.fields == {"param": "size"}
