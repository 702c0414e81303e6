"""`build-engine` and `bench`: export the teacher and build the TensorRT engine."""
