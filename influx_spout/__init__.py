"""influx-spout: a router for InfluxDB line-protocol metrics over NATS."""

__version__ = "0.1.0"
