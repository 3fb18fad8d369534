"""mls-relay: a Trio WebSocket relay and delivery service for MLS group chat."""

__version__ = "0.1.0"
