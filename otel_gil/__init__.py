"""otel-gil: GIL waits and holds, measured by eBPF uprobes, inside OpenTelemetry traces."""

__version__ = "0.1.0"
