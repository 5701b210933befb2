"""`python -m otel_gil`, same as the `otel-gil` command."""

from otel_gil.cli import entry_point

entry_point()
