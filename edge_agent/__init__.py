"""The edge agent: windows device telemetry, decides per window, sends what matters upstream."""
