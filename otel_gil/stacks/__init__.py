"""Holder stacks: what the GIL's holder was running while it held it. Taken by
the probes in the holder's own context (bpf/gil.bpf.c), unwound and symbolised
here, in the sidecar or `otel-gil record` (store.py, unwind.py, pyframes.py)."""
