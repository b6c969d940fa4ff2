"""Classify: architectures, preprocessing, ROI, aggregation, Grad-CAM, model specs."""
