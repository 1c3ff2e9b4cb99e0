"""Health, predictions and analytics results (DESIGN §2)."""
