"""The console's routes, mounted at `/console` by the router."""

from __future__ import annotations

from pathlib import Path

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from kiln.console.pages.accounts import ACCOUNT_ROUTES
from kiln.console.pages.billing import BILLING_ROUTES
from kiln.console.pages.catalog import CATALOG_ROUTES
from kiln.console.pages.deployments import DEPLOYMENT_ROUTES
from kiln.console.pages.home import HOME_ROUTES
from kiln.console.pages.keys import KEY_ROUTES
from kiln.console.pages.operator import OPERATOR_ROUTES
from kiln.console.pages.pods import POD_ROUTES

__all__ = ["console_mount"]

_STATIC = Path(__file__).parent / "static"


def console_mount() -> Mount:
    routes: list[BaseRoute] = [
        Route(path, handler, methods=methods)
        for path, handler, methods in [
            *HOME_ROUTES,
            *ACCOUNT_ROUTES,
            *KEY_ROUTES,
            *DEPLOYMENT_ROUTES,
            *POD_ROUTES,
            *BILLING_ROUTES,
            *CATALOG_ROUTES,
            *OPERATOR_ROUTES,
        ]
    ]
    routes.append(Mount("/static", StaticFiles(directory=_STATIC), name="console-static"))
    return Mount("/console", routes=routes)
