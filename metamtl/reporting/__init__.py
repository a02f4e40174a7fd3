"""Experiment reports (HTML with plots) and experiment trackers."""
