"""Datasets shipped with LPM (CSV tables with a README each); no code. Read with lpm.data.data_path."""
