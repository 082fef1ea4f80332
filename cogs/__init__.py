"""dreamcord: cogs."""
