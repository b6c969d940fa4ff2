"""Diagnostic accuracy: confusion-matrix metrics, ROC AUC, calibration, bootstrap intervals
and plots, from labels and scores. Imports nothing from the audit, so the training tools
reuse it as it is."""
