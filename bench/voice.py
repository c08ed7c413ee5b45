"""The voice agent through Kiln against the same pipeline in-process (issue 24), in one run: for
each turn, the time from the end of the user's speech to the first byte of the answer's audio,
broken down by stage.

    .venv/bin/python bench/voice.py [--turns 20] [--stt ID] [--chat ID] [--tts ID]

Both sides run `kiln.catalog.voice.VoiceAgent` with the same models (by default small random
Whisper, chat and VITS models built here; pass hub ids or directories for real ones) and speak
the same protocol with the same client: espeak-ng's speech streamed in 20 ms frames at real time,
0.7 s of silence after each sentence for the server's voice activity detection to end the turn.
"Through Kiln" is `kiln dev` with its defaults and the catalog's `voice-agent` deployment over
`WS /v1/realtime`; "in-process" is the agent's class instantiated here (its hooks run by hand,
its torch pool as wide as a replica's) with its session fed through memory. Turns alternate
between the two, so drift on a busy machine hits both alike; each answer is cancelled once its
first audio arrives (the next turn need not wait for it to play).

Stages (medians, ms): vad = from the end of speech until the server said it stopped (most of it
the silence the VAD waits for, `silence_duration_ms`); then, from there, the final transcript,
the first token and the first audio as the server timed them; e2e = end of speech to the first
audio byte at the client. Target: Kiln adds at most 10 ms p50 to e2e.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from warm_path import start_kiln
from websockets.asyncio.client import connect

import kiln
from kiln.catalog.realtime.session import RealtimeSession
from kiln.catalog.tiny import tiny_chat_model, tiny_speech_model, tiny_whisper_model
from kiln.catalog.voice import VoiceAgent
from kiln.devstack.ports import pick_port
from kiln.functions.audio import Pacer, Pcm, frames
from kiln.functions.audio_codec import decode

SENTENCES = (
    "What is the weather like today?",
    "Can you book a table for two at eight?",
    "Tell me something about the sea.",
    "How far is it to the station?",
    "Please remind me to call my sister.",
)
RATE = 24_000
SILENCE_S = 0.7


class MemorySession(kiln.Session):
    """A `kiln.Session` whose client is this process: two queues."""

    def __init__(self, params: Mapping[str, str]) -> None:
        self._params = dict(params)
        self.inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.outbox: asyncio.Queue[str | bytes] = asyncio.Queue()

    @property
    def params(self) -> Mapping[str, str]:
        return self._params

    async def receive(self) -> str | bytes:
        message = await self.inbox.get()
        if message is None:
            raise kiln.SessionClosed(1000)
        return message

    async def send(self, message: str | bytes) -> None:
        await self.outbox.put(message)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.inbox.put(None)


@dataclass
class Side:
    name: str
    send: Any  # async (str) -> None
    recv: Any  # async () -> str
    e2e_ms: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)

    def stage(self, name: str, value: float | None) -> None:
        if value is not None:
            self.stages.setdefault(name, []).append(value)


def utterance(text: str) -> tuple[bytes, int]:
    """`text` spoken at 24 kHz with silence after it; the byte offset where speech ends."""
    wav = subprocess.run(["espeak-ng", "--stdout", text], check=True, capture_output=True).stdout
    pcm = decode(wav, sample_rate=RATE).data
    return pcm + b"\x00\x00" * int(RATE * SILENCE_S), len(pcm)


async def turn(side: Side, audio: bytes, speech_bytes: int) -> None:
    """One turn: speak (while listening), note the first audio, cancel the rest."""
    moments: dict[str, float] = {}
    listening = asyncio.ensure_future(listen(side, moments))
    pacer = Pacer(RATE, lead_s=0.0)
    sent = 0
    for frame in frames(Pcm(audio, RATE), 20):
        if (wait := pacer.wait_s()) > 0:
            await asyncio.sleep(wait)
        append = {"type": "input_audio_buffer.append", "audio": base64.b64encode(frame).decode()}
        await side.send(json.dumps(append))
        pacer.sending(frame)
        sent += len(frame)
        if "speech_end" not in moments and sent >= speech_bytes:
            moments["speech_end"] = time.monotonic()
    report = await listening
    speech_end = moments["speech_end"]
    side.e2e_ms.append((moments["first_audio"] - speech_end) * 1000)
    side.stage("vad", (moments["stopped"] - speech_end) * 1000)
    for name in ("transcript", "first_token", "first_audio"):
        side.stage(name, report[f"{name}_ms"])


async def listen(side: Side, moments: dict[str, float]) -> dict[str, Any]:
    """The server's events until the answer is done: when each mattered, and its report."""
    while True:
        event = json.loads(await side.recv())
        kind = event["type"]
        if kind == "input_audio_buffer.speech_stopped":
            moments.setdefault("stopped", time.monotonic())
        elif kind == "response.output_audio.delta" and "first_audio" not in moments:
            moments["first_audio"] = time.monotonic()
            await side.send(json.dumps({"type": "response.cancel"}))
        elif kind == "response.done":
            report: dict[str, Any] = event["kiln"]["turn"]
            return report
        elif kind == "error":
            raise RuntimeError(f"{side.name}: {event['error']}")


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def table(sides: list[Side]) -> None:
    print(f"\n{'pipeline':<11} {'turns':>5} {'e2e p50':>8} {'e2e p90':>8} {'vad':>7} "
          f"{'transcript':>10} {'1st token':>9} {'1st audio':>9}   (ms)")  # fmt: skip
    for side in sides:
        med = {k: statistics.median(v) for k, v in side.stages.items()}
        print(f"{side.name:<11} {len(side.e2e_ms):>5} {p(side.e2e_ms, 0.5):>8.1f} "
              f"{p(side.e2e_ms, 0.9):>8.1f} {med.get('vad', 0):>7.1f} "
              f"{med.get('transcript', 0):>10.1f} {med.get('first_token', 0):>9.1f} "
              f"{med.get('first_audio', 0):>9.1f}")  # fmt: skip
    local, through = sides
    added = p(through.e2e_ms, 0.5) - p(local.e2e_ms, 0.5)
    verdict = "met" if added <= 10 else "NOT met"
    print(f"\nKiln adds {added:+.1f} ms at p50 (target: at most 10 ms): {verdict}")


async def run(args: argparse.Namespace, models: Path) -> None:
    parts = {"stt": args.stt, "chat": args.chat, "tts": args.tts}
    model_id = ",".join(f"{part}={value}" for part, value in parts.items())
    session = {"type": "session.update", "session": {"max_output_tokens": 16}}

    # In-process: the agent's class, its hooks run here.
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # as a replica's, under kiln dev
    agent = type("Agent", (VoiceAgent,), {"model_id": model_id})()
    agent.load()
    agent.start()
    memory = MemorySession({"model": "voice"})
    serving = asyncio.ensure_future(
        RealtimeSession(agent, memory, model="voice", idle_timeout_s=600).run()
    )
    local = Side("in-process", memory.inbox.put, memory.outbox.get)

    home = Path(tempfile.mkdtemp(prefix="kiln-bench-voice-"))
    port = pick_port([], set())
    proc, key = start_kiln(home, port, KILN_SANDBOX_SHARE=str(models))
    try:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=120) as client:
            made = await client.post(
                f"http://127.0.0.1:{port}/v1/deployments", headers=headers,
                json={"catalog": "voice-agent", "name": "voice", "model": model_id,
                      "gpu": "none", "min_replicas": 1},
            )  # fmt: skip
        made.raise_for_status()
        async with connect(
            f"ws://127.0.0.1:{port}/v1/realtime?model=voice", additional_headers=headers,
            open_timeout=600, max_size=None,
        ) as ws:  # fmt: skip
            through = Side("Kiln", ws.send, ws.recv)
            for side in (local, through):
                assert json.loads(await side.recv())["type"] == "session.created"
                await side.send(json.dumps(session))
                assert json.loads(await side.recv())["type"] == "session.updated"
            spoken = [utterance(text) for text in SENTENCES]
            # A first turn each, not counted: the first run of every model is slow.
            for side in (local, through):
                await turn(side, *spoken[0])
                side.e2e_ms.clear()
                side.stages.clear()
            for i in range(args.turns):
                for side in (local, through) if i % 2 == 0 else (through, local):
                    await turn(side, *spoken[i % len(spoken)])
                print(f"turn {i + 1}/{args.turns}: in-process {local.e2e_ms[-1]:.0f} ms, "
                      f"Kiln {through.e2e_ms[-1]:.0f} ms", flush=True)  # fmt: skip
        table([local, through])
    finally:
        await memory.close()
        serving.cancel()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--stt", help="a Whisper-family hub id or directory (default: tiny)")
    parser.add_argument("--chat", help="a chat model's hub id or directory (default: tiny)")
    parser.add_argument("--tts", help="a VITS hub id or directory (default: tiny)")
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit("bench/voice.py speaks with espeak-ng: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory(prefix="kiln-voice-models-") as name:
        models = Path(name)
        models.chmod(0o755)
        args.stt = args.stt or str(tiny_whisper_model(models / "stt"))
        args.chat = args.chat or str(tiny_chat_model(models / "chat"))
        args.tts = args.tts or str(tiny_speech_model(models / "tts"))
        asyncio.run(run(args, models))


if __name__ == "__main__":
    main()
