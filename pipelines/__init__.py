"""dreamcord: pipelines."""
