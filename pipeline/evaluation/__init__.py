"""Evaluation: metrics, tables, plots and drawings for the report."""
