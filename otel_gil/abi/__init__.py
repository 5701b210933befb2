"""Byte layouts shared across processes (kernel <-> sidecar, app <-> sidecar), each
mirrored once; tests/test_events.py checks them against bpf/gil.h with gcc."""
