"""Simulated machines that publish telemetry batches and keep a ledger of what they produced."""
