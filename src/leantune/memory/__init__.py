"""Memory: measurement now; the analytic memory model (params, grads, optimizer, activations) later."""
