"""dreamcord: user-supplied adapters (LoRA, embeddings) and the safe reading of their weight files."""
