"""MLflow: experiment tracking, model registration with lineage, promotion, and serving."""
