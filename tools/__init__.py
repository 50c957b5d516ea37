"""Developer tools (`python -m tools.make_workflows`) and the headless trainer (tools/train_domain.py)."""
