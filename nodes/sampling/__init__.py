"""The sampling runtime behind the sampler and guider nodes: a run as the nodes make it (run.py),
DomainGuider (guider.py), its domain
terms and their kinds (domains.py), the conditioning it checks and builds (conditioning.py), the
model calls of its steps (step_calls.py) and their fast path (fastpath.py, its rules in
fastpath_rules.py, LoRA domains as adapters: the host's patches read in lora_adapters.py, hooked by
the pack's lora_hooks/, their rows in the base's call in lora_rows_in_base_call.py). Imports nothing from
training/ or nodes/training/."""
