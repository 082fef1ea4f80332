"""Users' own adapters (LoRA, textual inversion, hypernetworks, VAEs): read safely, recognise, apply."""
