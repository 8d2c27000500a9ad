"""Alembic's entry point for servelab's store: `runner.store.Store` calls it with an open connection
(`config.attributes["connection"]`) inside the transaction that holds the migration lock."""

from alembic import context
from sqlmodel import SQLModel

import runner.models  # noqa: F401  (the tables register on SQLModel.metadata)

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    transactional_ddl=True,  # SQLite too: the whole upgrade is the caller's one transaction
    render_as_batch=connection.dialect.name == "sqlite",  # ALTER of a SQLite table copies it
)
with context.begin_transaction():
    context.run_migrations()
