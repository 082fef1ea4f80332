"""Alembic revision scripts (a package only so that they ship with an installed wheel)."""
