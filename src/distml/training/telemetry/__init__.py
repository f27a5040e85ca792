"""What a training run reports while it runs: MLflow tracking, TensorBoard, system metrics."""
