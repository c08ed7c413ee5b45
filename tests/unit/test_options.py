"""Options of `@app.function` / `@app.cls`: defaults, Modal's aliases, GPU spellings, and one
exact message per kind of bad value."""

from __future__ import annotations

import re
from typing import Any

import pytest

import kiln
from kiln.errors import InvalidSpec
from kiln.functions.gpu import parse_gpu
from kiln.functions.spec import Resources

GPU_RULE = (
    'expected "none", "any" or one of T4, L4, A10G, A100, A100-80GB, L40S, H100, H200, B200, '
    'optionally with a count from 1 to 8 such as "H100:2".'
)


def resources(**options: Any) -> Resources:
    app = kiln.App("hello")

    def shout(text: str) -> str:
        return text

    return app.function(**options)(shout).spec.resources


def fails(message: str, **options: Any) -> None:
    with pytest.raises(InvalidSpec, match=f"^{re.escape(message)}$"):
        resources(**options)


def test_defaults_follow_the_design() -> None:
    assert resources() == Resources(
        gpu="none",
        min_replicas=0,
        max_replicas=4,
        buffer_replicas=0,
        idle_timeout_s=300,
        concurrency=1,
        target_concurrency=1,
        timeout_s=300,
        startup_timeout_s=600,
        retries=0,
        memory_mb=None,
        env={},
        secrets=(),
    )


def test_the_options_written_are_recorded_under_their_field_names() -> None:
    """A redeploy replaces an operator's live change only with a value the developer wrote."""
    assert resources().explicit == ()
    written = resources(scaledown_window=60, max_replicas=2, name="loud", gpu="any")
    assert written.explicit == ("gpu", "idle_timeout_s", "max_replicas")
    # target_concurrency follows concurrency by default; only concurrency was written.
    assert resources(concurrency=3).explicit == ("concurrency",)


@pytest.mark.parametrize(
    ("alias", "option", "value", "field"),
    [
        ("min_containers", "min_replicas", 2, "min_replicas"),
        ("max_containers", "max_replicas", 9, "max_replicas"),
        ("buffer_containers", "buffer_replicas", 1, "buffer_replicas"),
        ("scaledown_window", "idle_timeout", 60, "idle_timeout_s"),
        ("allow_concurrent_inputs", "concurrency", 3, "concurrency"),
        ("memory", "memory_mb", 512, "memory_mb"),
        ("keep_warm", "min_replicas", 1, "min_replicas"),
        ("concurrency_limit", "max_replicas", 7, "max_replicas"),
        ("container_idle_timeout", "idle_timeout", 30, "idle_timeout_s"),
    ],
)
def test_modal_aliases(alias: str, option: str, value: int, field: str) -> None:
    assert getattr(resources(**{alias: value}), field) == value
    assert resources(**{alias: value}) == resources(**{option: value})


def test_alias_and_its_name_together() -> None:
    fails(
        "min_replicas and min_containers were both given for function 'shout': min_containers "
        "is Modal's name for min_replicas, so keep only one of them.",
        min_containers=1,
        min_replicas=1,
    )
    fails(
        "memory_mb and memory were both given for function 'shout': memory is Modal's name for "
        "memory_mb, so keep only one of them.",
        memory=1,
        memory_mb=1,
    )


def test_messages_use_the_name_the_user_wrote() -> None:
    fails(
        "max_containers=0 is not valid for function 'shout': expected an integer from 1 to 1000.",
        max_containers=0,
    )


def test_unknown_option_suggests_the_closest() -> None:
    fails(
        "@app.function got an unknown option max_replica=3 for function 'shout'; did you mean "
        "max_replicas?",
        max_replica=3,
    )
    fails(
        "@app.function got an unknown option scaledown_windows=3 for function 'shout'; did you "
        "mean scaledown_window?",
        scaledown_windows=3,
    )


def test_unknown_option_without_a_close_name_lists_the_options() -> None:
    fails(
        "@app.function got an unknown option image='debian' for function 'shout'; the options "
        "are name, gpu, min_replicas, max_replicas, buffer_replicas, idle_timeout, concurrency, "
        "target_concurrency, timeout, startup_timeout, retries, memory_mb, env, secrets, snapshot.",
        image="debian",
    )


def test_unknown_option_on_a_class() -> None:
    with pytest.raises(InvalidSpec) as caught:

        @kiln.App("hello").cls(gpus="A10G")  # type: ignore[call-overload]
        class Greeter:
            @kiln.method
            def greet(self) -> None: ...

    assert caught.value.message == (
        "@app.cls got an unknown option gpus='A10G' for class 'Greeter'; did you mean gpu?"
    )


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("min_replicas", -1, "an integer from 0 to 1000"),
        ("min_replicas", 1001, "an integer from 0 to 1000"),
        ("min_replicas", 1.5, "an integer from 0 to 1000"),
        ("min_replicas", True, "an integer from 0 to 1000"),
        ("min_replicas", "2", "an integer from 0 to 1000"),
        ("max_replicas", 0, "an integer from 1 to 1000"),
        ("max_replicas", None, "an integer from 1 to 1000"),
        ("buffer_replicas", -2, "an integer from 0 to 1000"),
        ("idle_timeout", -1, "a whole number of seconds from 0 to 86400"),
        ("idle_timeout", 2.5, "a whole number of seconds from 0 to 86400"),
        ("concurrency", 0, "an integer from 1 to 1000"),
        ("concurrency", False, "an integer from 1 to 1000"),
        ("target_concurrency", 0, "an integer from 1 to 1000"),
        ("timeout", 0, "a whole number of seconds from 1 to 86400"),
        ("timeout", -5, "a whole number of seconds from 1 to 86400"),
        ("timeout", 86_401, "a whole number of seconds from 1 to 86400"),
        ("startup_timeout", 0, "a whole number of seconds from 1 to 86400"),
        ("retries", -1, "an integer from 0 to 10"),
        ("retries", 11, "an integer from 0 to 10"),
        ("memory_mb", 0, "a whole number of megabytes from 1 to 4194304"),
        ("memory", (1024, 2048), "a whole number of megabytes from 1 to 4194304"),
    ],
)
def test_bad_numbers(option: str, value: object, expected: str) -> None:
    fails(
        f"{option}={value!r} is not valid for function 'shout': expected {expected}.",
        **{option: value},
    )


def test_edges_of_the_ranges_are_allowed() -> None:
    got = resources(min_replicas=0, max_replicas=1000, idle_timeout=0, timeout=86_400, retries=10)
    assert (got.min_replicas, got.max_replicas, got.idle_timeout_s, got.timeout_s) == (
        0,
        1000,
        0,
        86_400,
    )
    assert resources(memory_mb=None).memory_mb is None


def test_min_above_max_names_both() -> None:
    fails(
        "min_replicas=5 is not valid for function 'shout': expected at most max_replicas=2.",
        min_replicas=5,
        max_replicas=2,
    )
    fails(
        "min_containers=5 is not valid for function 'shout': expected at most max_containers=2.",
        min_containers=5,
        max_containers=2,
    )


def test_min_above_the_default_max() -> None:
    fails(
        "min_replicas=5 is not valid for function 'shout': expected at most max_replicas=4 "
        "(the default); set max_replicas too.",
        min_replicas=5,
    )


def test_target_concurrency_above_concurrency() -> None:
    fails(
        "target_concurrency=8 is not valid for function 'shout': expected at most concurrency=4.",
        concurrency=4,
        target_concurrency=8,
    )
    fails(
        "target_concurrency=2 is not valid for function 'shout': expected at most concurrency=1 "
        "(the default); set concurrency too.",
        target_concurrency=2,
    )


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        (None, "none"),
        ("none", "none"),
        ("NONE", "none"),
        ("any", "any"),
        ("Any:2", "any:2"),
        ("t4", "T4"),
        ("a10g", "A10G"),
        ("a100-80gb", "A100-80GB"),
        ("l40s", "L40S"),
        ("H100", "H100"),
        ("h100:2", "H100:2"),
        ("H200:8", "H200:8"),
        ("B200:1", "B200"),
        (" A10G ", "A10G"),
    ],
)
def test_gpu_spellings_are_normalised(given: str | None, canonical: str) -> None:
    assert parse_gpu(given) == canonical
    assert resources(gpu=given).gpu == canonical


@pytest.mark.parametrize(
    "value",
    ["X100", "A10", "H100:0", "H100:9", "H100:", "H100:two", "H100:+2", "none:2", 1, ["T4"]],
)
def test_unknown_gpu(value: object) -> None:
    fails(f"gpu={value!r} is not valid for function 'shout': {GPU_RULE}", gpu=value)


def test_env_and_secrets_are_kept() -> None:
    got = resources(env={"HF_HOME": "/cache", "_X": ""}, secrets=("hf", "openai-key"))
    assert got.env == {"HF_HOME": "/cache", "_X": ""}
    assert got.secrets == ("hf", "openai-key")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            ["A=1"],
            "env=['A=1'] is not valid for function 'shout': expected a dict of names to "
            'strings, such as {"LOG_LEVEL": "debug"}.',
        ),
        (
            {"TOKEN": "hf_secret", "A": 1},
            "env['A']=1 is not valid for function 'shout': expected a string, such as '1'.",
        ),
        (
            {"A": None},
            "env['A']=None is not valid for function 'shout': expected a string.",
        ),
        (
            {"A": "a\0b"},
            "env['A'] is not valid for function 'shout': it holds a NUL character, which no "
            "variable can.",
        ),
        (
            {"TOKEN": "hf_secret", "MY-VAR": "x"},
            "env key 'MY-VAR' is not valid for function 'shout': expected letters, digits and "
            "underscores, not starting with a digit.",
        ),
        (
            {1: "x"},
            "env key 1 is not valid for function 'shout': expected letters, digits and "
            "underscores, not starting with a digit.",
        ),
        (
            {"kiln_nats_url": "x"},
            "env key 'kiln_nats_url' is not valid for function 'shout': names starting with "
            "KILN_ are reserved for Kiln.",
        ),
    ],
)
def test_bad_env(env: object, message: str) -> None:
    fails(message, env=env)


@pytest.mark.parametrize(
    ("secrets", "expected"),
    [
        ("hf", 'expected a list of secret names, such as ["huggingface"]'),
        ({"hf": "x"}, 'expected a list of secret names, such as ["huggingface"]'),
        (
            ["hf", 3],
            "3 is not a secret name; expected names of 1 to 63 letters, digits, hyphens and "
            'underscores, starting with a letter, such as ["huggingface"]',
        ),
        (
            ["my secret"],
            "'my secret' is not a secret name; expected names of 1 to 63 letters, digits, "
            'hyphens and underscores, starting with a letter, such as ["huggingface"]',
        ),
    ],
)
def test_bad_secrets(secrets: object, expected: str) -> None:
    fails(f"secrets={secrets!r} is not valid for function 'shout': {expected}.", secrets=secrets)
