"""dreamcord: tests."""
