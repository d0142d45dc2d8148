"""gs-ray evaluate: gradient analysis, baselines, scoring, diagnostics, the comparison and the report."""
