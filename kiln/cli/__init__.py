"""The `kiln` command line (typer). A thin client: it reads Settings and config.toml, then calls
the package or, for later commands, the control API."""
