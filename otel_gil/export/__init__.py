"""Getting spans out of the sidecar: protobuf encoding, a bounded queue with
counted drops, and the OTLP exporter choice."""
