"""Evaluation: metrics, threshold tuning, bootstrap intervals, the gate, scoring, reports."""
