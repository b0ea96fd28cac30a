"""Results out of a study: export, evaluation, prediction, reports."""
