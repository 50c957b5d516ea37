"""The harness the tests, bench/ and tools/ share: the real ComfyUI host started in-process
(`host`), tiny models of the host's own classes (`tiny_nodes`, `tiny_families`), graphs in the
host's prompt format (`graphs`, `workflow_api`), a live server with a browser (`live_server`,
`cdp`) and the training loop's stand-ins (`standins`).

Imported as `tests.support.*` with the repository's root on `sys.path` (conftest.py puts it
there; bench/ and tools/ run as modules from the root: `python -m bench.sampling`)."""
