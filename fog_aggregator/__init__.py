"""The fog aggregator: receives edge records through custody, forwards them, adds site rollups."""
