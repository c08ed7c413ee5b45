"""The SDK: `App`, `@app.function`, `@app.cls`, `@enter`/`@exit`/`@method` and specification
validation. Light by rule: standard library only, no torch, no database or NATS drivers.

Users reach the SDK through `kiln` (`kiln.App`, `kiln.enter`, ...). The platform's side lives in
modules imported only where needed, so `import kiln` does not pay for them:
`kiln.functions.package` (`package` for `kiln deploy`, `unpack` for the replica) and
`kiln.functions.loader` (`load_app`, `resolve` for the replica).
"""

from kiln.functions.app import App, Function
from kiln.functions.hooks import Lifecycle, enter, exit, lifecycle, method

__all__ = ["App", "Function", "Lifecycle", "enter", "exit", "lifecycle", "method"]
