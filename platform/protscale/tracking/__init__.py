"""The MLflow tracking contract (``contract``) and the trial-side run writer (``runs``)."""
