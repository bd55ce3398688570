"""Fitting steering from data: labelled completions, per-head probes, steering directions, reports."""
