"""The evaluation report: Markdown and its plots."""
