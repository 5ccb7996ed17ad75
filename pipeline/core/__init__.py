"""Foundations every other part uses: the error type, atomic writes, hashing, device choice,
logging."""
