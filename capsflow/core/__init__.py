"""The core: op definitions, compiler, shapes, schedule, executor, gradients and the compiled Graph."""
