"""lungscreen models and the shared training core (`nets.train.Learner`)."""
