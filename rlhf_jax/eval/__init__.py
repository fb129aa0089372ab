"""Evaluation of policies: the evaluator, its statistics and the report."""
