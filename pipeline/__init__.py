"""lungscreen orchestration: CLI, the screen, batch runs, stage cache, outputs, evaluation, LUNA16 reading, training."""
