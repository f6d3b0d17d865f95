"""upweight: multi-objective ranking by sample loss weighting."""
