"""The BPF side: the only user of bcc. Compile and attach bpf/gil.bpf.c, and
drive it as a Session (targets, events, per-thread totals)."""
