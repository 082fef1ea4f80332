"""Alembic migrations of the dreamcord database (run from code by :class:`storage.db.Database`)."""
