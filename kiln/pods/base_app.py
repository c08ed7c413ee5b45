"""The app a pod runs when it names none (`{"environment": {"requirements": [...]}}`): one
function that only carries an environment, Kiln's own, with no code or secrets of the
customer's. The router deploys it into the customer's account, as `POD_APP`, at their first
such pod, like a catalog deployment (`kiln.router.deployments`): an ordinary app they may see,
and delete when they have no pods left.
"""

from __future__ import annotations

import hashlib

from kiln.functions.app import App
from kiln.functions.package import archive_of

__all__ = ["APP_FILE", "POD_APP", "base_app", "package_base_app"]

POD_APP = "pod-env"
APP_FILE = "app.py"
_SOURCE = (
    '"""The environment of pods that name no app of their own (deployed by Kiln)."""\n\n'
    "from kiln.pods.base_app import base_app\n\n"
    "app = base_app()\n"
)


def environment() -> str:
    """Pods run terminals and servers, not calls: this says what the app is for."""
    return "the environment of Kiln pods that name no app of their own"


def base_app() -> App:
    app = App(POD_APP)
    app.function(gpu="none", max_replicas=1)(environment)
    return app


def package_base_app() -> tuple[App, str, bytes]:
    """The app, its archive's digest and bytes (the same every time: deploying it again
    changes nothing)."""
    archive = archive_of([(APP_FILE, _SOURCE.encode(), 0o644)])
    return base_app(), hashlib.sha256(archive).hexdigest(), archive
