"""lungscreen orchestration: CLI, batch runs, stage cache, evaluation, benchmarks."""
