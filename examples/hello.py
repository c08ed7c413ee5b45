"""The smallest Kiln app: a plain function and a class with a setup hook, both on CPU.

kiln deploy examples/hello.py
kiln call hello/shout '{"text": "hi"}'
kiln call hello/Greeter.greet '{"name": "Ada"}'
"""

import kiln

app = kiln.App("hello")


@app.function(gpu="none")
def shout(text: str) -> str:
    return text.upper() + "!"


@app.cls(gpu="none")
class Greeter:
    greeting: str

    @kiln.enter()
    def setup(self) -> None:
        # Runs once per replica, before its first call: the place to load a model.
        self.greeting = "Hello"

    @kiln.method()
    def greet(self, name: str) -> str:
        return f"{self.greeting}, {name}!"
