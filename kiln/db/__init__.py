"""Kiln's database: SQLAlchemy 2 models, async engine and session helpers, and migrations.

The schema changes only through Alembic revisions in `migrations/`; `kiln.db.migrate` applies
them. Import from the submodules: `kiln.db.models` (every table, registered on `Base.metadata`),
`kiln.db.enums` (the closed sets, standard library only, so light code can use them),
`kiln.db.session` (engine and transactions) and `kiln.db.migrate`.
"""
