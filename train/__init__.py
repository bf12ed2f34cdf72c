"""tristage training package."""
