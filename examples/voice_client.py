"""Talk to a deployed voice agent with a WAV file: the file is streamed as a microphone would
stream it, and the agent's spoken answer is saved as a WAV file.

    kiln catalog deploy voice-agent --name voice    # --model "stt=ID,chat=ID,tts=ID" to choose
    python examples/voice_client.py --model voice question.wav --out answer.wav

It speaks OpenAI's Realtime protocol over `WS /v1/realtime?model=NAME` (the URL and key come from
KILN_URL and KILN_API_KEY, or from what `kiln dev` wrote): 20 ms frames of 24 kHz PCM16 as
`input_audio_buffer.append`, at real time, then a second of silence so the server's voice
activity detection ends the turn. It prints what the server heard and said as the events come,
and the time from the end of your speech to the first audio of the answer.

The WAV file may have any rate and channel count (a rate other than 16 or 24 kHz needs PyAV:
`pip install av`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from pathlib import Path

from websockets.asyncio.client import connect

from kiln.client import client_settings
from kiln.functions.audio import Pacer, Pcm, frames, read_wav, wav_header

RATE = 24_000


def load(path: Path) -> Pcm:
    pcm = read_wav(path.read_bytes())
    if pcm.sample_rate in (16_000, 24_000):
        return pcm
    from kiln.functions.audio_codec import decode

    return decode(path.read_bytes(), sample_rate=RATE, filename=path.name)


async def talk(model: str, speech: Pcm, max_tokens: int | None) -> bytes:
    """The agent's spoken answer to `speech` (24 kHz PCM16 mono)."""
    settings = client_settings()
    if not settings.url or not settings.api_key:
        raise SystemExit("no Kiln to talk to: start `kiln dev`, or set KILN_URL and KILN_API_KEY")
    url = settings.url.replace("http", "ws", 1).rstrip("/") + f"/v1/realtime?model={model}"
    headers = {"Authorization": f"Bearer {settings.api_key}"}
    answer = bytearray()
    async with connect(url, additional_headers=headers, open_timeout=300, max_size=None) as ws:
        update: dict[str, object] = {
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": speech.sample_rate}}},
            "max_output_tokens": "inf" if max_tokens is None else max_tokens,
        }
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        sent_at: list[float] = []  # when each 20 ms frame left
        speech_ended: float | None = None

        async def microphone() -> None:
            pacer = Pacer(speech.sample_rate, lead_s=0.0)
            silence = b"\x00\x00" * speech.sample_rate
            for frame in frames(Pcm(speech.data + silence, speech.sample_rate), 20):
                if (wait := pacer.wait_s()) > 0:
                    await asyncio.sleep(wait)
                audio = base64.b64encode(frame).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
                pacer.sending(frame)
                sent_at.append(time.monotonic())

        sending = asyncio.ensure_future(microphone())
        async for message in ws:
            event = json.loads(message)
            kind = event["type"]
            if kind == "input_audio_buffer.speech_stopped":
                # When the frame holding the end of speech (as the server heard it) left here.
                frame = min(len(sent_at) - 1, event["audio_end_ms"] // 20)
                speech_ended = sent_at[frame] if frame >= 0 else time.monotonic()
            elif kind == "conversation.item.input_audio_transcription.completed":
                print(f"you said:   {event['transcript']}")
            elif kind == "response.output_audio.delta":
                if not answer and speech_ended is not None:
                    waited = (time.monotonic() - speech_ended) * 1000
                    print(f"first audio {waited:.0f} ms after the end of your speech")
                answer += base64.b64decode(event["delta"])
            elif kind == "response.output_audio_transcript.done":
                print(f"agent said: {event['transcript']}")
            elif kind == "error":
                print(f"error: {event['error']['message']}")
            elif kind == "response.done":
                break
        sending.cancel()
    return bytes(answer)


def main() -> None:
    parser = argparse.ArgumentParser(description="Talk to a Kiln voice agent with a WAV file.")
    parser.add_argument("wav", type=Path, help="what you say, as a WAV file")
    parser.add_argument("--model", default="voice", help="the voice-agent deployment's name")
    parser.add_argument("--out", type=Path, default=Path("answer.wav"), help="where to save")
    parser.add_argument("--max-tokens", type=int, help="the longest answer, in tokens")
    args = parser.parse_args()
    answer = asyncio.run(talk(args.model, load(args.wav), args.max_tokens))
    args.out.write_bytes(wav_header(RATE, samples=len(answer) // 2) + answer)
    print(f"saved {len(answer) / 2 / RATE:.1f} s of the answer to {args.out}")


if __name__ == "__main__":
    main()
