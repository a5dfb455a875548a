"""Public ops: input validation, backend choice and autograd wiring, one module per op family."""
