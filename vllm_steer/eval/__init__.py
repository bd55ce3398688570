"""Evaluation helpers (multiple-choice scoring under steering)."""
