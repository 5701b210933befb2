"""What runs inside the traced app: the agent that finds or starts a sidecar, the
wire protocol, the context-table writer and the process-context publisher.

Nothing here imports the sidecar side (bcc, pyelftools, capstone, grpc, or
otel_gil.probes/target/sidecar/export): tests/test_app_imports.py checks."""
