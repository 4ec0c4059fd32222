"""Knock's condition model: operators, argument parsing, the SQL compiler and a reference evaluator."""
