"""Synthetic sacroiliac-joint CT and MR studies with known truth, deterministic by seed."""
