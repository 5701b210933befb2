"""The sidecar: the server loop, thread identities, the timeline (who held the
GIL during a wait), spans and metrics built from what the probes decoded."""
