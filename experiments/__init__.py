"""Runnable studies assembled from the core, the domains, calibration and archetypes."""
