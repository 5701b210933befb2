"""For the developer's terminal: `otel-gil demo`, its report, and the embedded
OTLP receiver it (and the tests) collect spans and metrics with."""
