"""Language models: loading checkpoints, generation backends, teacher-forced scoring."""
