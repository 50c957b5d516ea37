"""Small-scale experiments that reproduce the paper's claims (pure torch, no ComfyUI); see docs/EVIDENCE.md."""
