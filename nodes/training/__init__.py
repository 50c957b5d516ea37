"""The training runtime behind Train Domain UNet: the host's objects adapted to the host-free
trainer in training/ (run.py: run_training; inputs.py: the MODEL read once (HostModel), the VAE
and the empty prompt; families.py: per-family targets; differentiable.py: the host's model,
weights and layers under autograd; files.py: outputs, caches, resume; progress.py: previews and
progress; plot.py: the loss curve)."""
