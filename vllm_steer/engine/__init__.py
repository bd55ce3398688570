"""Engine-side state that lives in each worker: the steering table and the per-step planner."""
