"""fogline: an MQTT fog-layer message pipeline with end-to-end custody."""

__version__ = "0.1.0"
