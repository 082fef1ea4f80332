"""dreamcord: models."""
