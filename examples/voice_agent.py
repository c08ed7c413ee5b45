"""A voice agent over WebSocket: audio frames in, audio frames out, for as long as the call lasts.

kiln deploy examples/voice_agent.py
Then open ws://127.0.0.1:8000/v1/ws/voice/Agent.talk?voice=calm with
`Authorization: Bearer $KILN_API_KEY`, send 20 ms frames of 16 kHz 16-bit mono PCM (640 bytes)
as binary messages, and text messages for control ("bye" ends the call).

The "model" here is a stand-in that halves the volume of each frame: this file shows the
WebSocket plumbing. The real pipeline (voice activity detection, Whisper, a chat model, a voice,
barge-in) is the catalog's `voice-agent` (`kiln catalog deploy voice-agent --name voice`), spoken
to over OpenAI's Realtime protocol; `examples/voice_client.py` talks to it.
"""

import array

import kiln

app = kiln.App("voice")


@app.cls(concurrency=4, idle_timeout=120)
class Agent:
    gain: float

    @kiln.enter()
    def load(self) -> None:
        self.gain = 0.5  # where a real agent loads its speech models

    @kiln.websocket()
    async def talk(self, session: kiln.Session) -> None:
        voice = session.params.get("voice", "default")
        await session.send(f"hello, speaking with the {voice} voice")
        async for message in session:
            if isinstance(message, str):
                if message == "bye":
                    await session.close(1000, "goodbye")
                    return
                await session.send(f"heard: {message}")
                continue
            samples = array.array("h", message)
            quieter = array.array("h", (int(s * self.gain) for s in samples))
            await session.send(quieter.tobytes())
